"""The processor shared by all families (remote code: `processing_xclip.py`)."""

from .processing_xclip import XCLIPProcessor, load_rgb, warn_truncated

XCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["XCLIPProcessor", "load_rgb", "warn_truncated"]
