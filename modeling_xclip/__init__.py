"""Multilingual CLIP models, the Hugging Face way.

`configuration_xclip.py` and `modeling_xclip.py` are the remote code that every saved model carries; importing this
package also registers the three families with `AutoConfig` / `AutoModel`, so that a published M-CLIP checkpoint
(whose config.json has no `auto_map`) loads with `AutoModel.from_pretrained(dir)` once `modeling_xclip` is imported.
"""

from transformers import AutoConfig, AutoModel

from .configuration_xclip import MCLIPConfig, XAltCLIPConfig, XMCLIPConfig, resolve_model_base
from .losses import contrastive_loss
from .modeling_xclip import MCLIPModel, XAltCLIPModel, XCLIPOutput, XCLIPPreTrainedModel, XMCLIPModel

FAMILIES = {"altclip": XAltCLIPModel, "mclip": XMCLIPModel, "m-clip": MCLIPModel}

for _model_class in FAMILIES.values():
    _config_class = _model_class.config_class
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    # save_pretrained writes `auto_map` and copies the remote-code files
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")

__all__ = ["FAMILIES", "MCLIPConfig", "MCLIPModel", "XAltCLIPConfig", "XAltCLIPModel", "XCLIPOutput",
           "XCLIPPreTrainedModel", "XMCLIPConfig", "XMCLIPModel", "contrastive_loss", "resolve_model_base"]
