"""Bottleneck adapters (Houlsby) and Compacter for per-language PET heads of M-CLIP (seed paper 000 §3.2), hosted by
PEFT so that every method's per-language adapter loads with `PeftModel.from_pretrained(base, dir, subfolder=lang)`.

This file is remote code: `modeling_xclip.py` imports it relatively, so `save_pretrained` copies it next to the
weights and a user with only `trust_remote_code` gets it. It imports public torch and PEFT API only, and nothing
here is needed when PEFT is absent (`PEFT_AVAILABLE` is then False and the models load as before).

Why our own code: PEFT has no bottleneck adapter and no Compacter; `adapters` pins transformers 4.x and OpenDelta
(the paper's code) no longer runs on current transformers. PEFT cannot register a new method type from outside
(`register_peft_method` needs a member of its `PeftType` enum), and its LoRA custom-module dispatch lives on the
config object, which `PeftModel.from_pretrained` rebuilds from JSON without it. So the hosts live in the model:
`attach_pet_hosts` gives the output projection of every attention block and every feed-forward block (the `dense`
of XLM-R's `attention.output` and `output`) two parameter-free host modules, `pet_adapter` and `pet_compacter`,
applied to that projection's output by a forward hook, before dropout, the residual connection and the LayerNorm,
where Houlsby et al. place an adapter. The hosts are `LoraLayer`s: a `LoraConfig` whose `target_modules` name them
makes PEFT call their `update_layer`, which adds the adapter under the adapter name; PEFT then saves, loads,
switches (`set_adapter`) and deletes it like LoRA. The method is in the target's name, so an Adapter checkpoint can
never load as Compacter (or as LoRA), and without the hosts PEFT raises "Target modules ... not found".
"""

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

try:  # PEFT is optional for the models themselves
    from peft.tuners.lora import LoraLayer

    PEFT_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without peft
    LoraLayer = object
    PEFT_AVAILABLE = False

# output projections of the attention and feed-forward blocks, by encoder family (XLM-R/BERT/LaBSE, DistilBERT)
BLOCK_OUTPUT_SUFFIXES = ("attention.output.dense", "output.dense", "attention.out_lin", "ffn.lin2")
ADAPTER_HOST, COMPACTER_HOST = "pet_adapter", "pet_compacter"
# Compacter's hypercomplex dimension k (number of Kronecker products) and the rank of each B_i (OpenDelta's defaults)
PHM_DIM, PHM_RANK = 4, 1


class Bottleneck(nn.Module):
    """Houlsby adapter (seed paper 000 eq. 5 / eq. 10): f(x W_down) W_up, the caller adds x (the residual).

    W_up starts at zero, so a new adapter is the identity map."""

    def __init__(self, width, bottleneck):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


def kronecker_sum(rule, factors):
    """sum_i A_i ⊗ B_i for A = `rule` (k, k, k) and B = `factors` (k, p, q): a (k p, k q) matrix."""
    k, p, q = factors.shape
    return torch.einsum("iab,icd->acbd", rule, factors).reshape(k * p, k * q)


class CompacterBottleneck(nn.Module):
    """Compacter (seed paper 000 eq. 6 / eq. 11): the adapter's W_down = sum_i A_i ⊗ (s_i t_i), and W_up the same
    way with the same A_i (`phm_rule`); s_i t_i is the rank-`rank` factorisation of B_i."""

    def __init__(self, width, bottleneck, k=PHM_DIM, rank=PHM_RANK):
        super().__init__()
        if width % k or bottleneck % k:
            raise ValueError(f"Compacter needs the width ({width}) and the bottleneck ({bottleneck}) divisible by "
                             f"its hypercomplex dimension k={k}")
        self.phm_rule = nn.Parameter(torch.empty(k, k, k))
        self.down_s = nn.Parameter(torch.empty(k, width // k, rank))
        self.down_t = nn.Parameter(torch.empty(k, rank, bottleneck // k))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck))
        self.up_s = nn.Parameter(torch.empty(k, bottleneck // k, rank))
        self.up_t = nn.Parameter(torch.zeros(k, rank, width // k))  # W_up = 0: a new adapter is the identity map
        self.up_bias = nn.Parameter(torch.zeros(width))
        nn.init.normal_(self.phm_rule, std=1.0 / k)
        for factor in (self.down_s, self.down_t, self.up_s):
            nn.init.normal_(factor, std=1.0 / math.sqrt(factor.shape[1]))

    def weights(self):
        """(W_down, W_up) as dense matrices, (width, bottleneck) and (bottleneck, width)."""
        return (kronecker_sum(self.phm_rule, self.down_s @ self.down_t),
                kronecker_sum(self.phm_rule, self.up_s @ self.up_t))

    def forward(self, x):
        down, up = self.weights()
        return F.gelu(x @ down.to(x.dtype) + self.down_bias) @ up.to(x.dtype) + self.up_bias


class _BlockOutputHost(nn.Module, LoraLayer):
    """A parameter-free host for one kind of adapter on one block output, filled by PEFT (see the module docstring).

    PEFT calls `update_layer` with the adapter name, the `LoraConfig` and `r` (the bottleneck width); the adapter's
    parameters live in `lora_bottleneck[adapter_name]` (the "lora_" prefix is what PEFT's LoRA saves and loads)."""

    adapter_layer_names = ("lora_bottleneck",)
    other_param_names = ("r",)
    bottleneck_class = None

    def __init__(self, owner):
        nn.Module.__init__(self)
        self.width = owner.out_features
        self._owner = weakref.ref(owner)  # the hosting projection (not a submodule): where new adapters are placed
        LoraLayer.__init__(self, nn.Identity())
        self.lora_bottleneck = nn.ModuleDict()

    def _get_in_out_features(self, module):
        return self.width, self.width

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        bottleneck = self.bottleneck_class(self.width, r)
        owner = self._owner()
        if owner is not None and owner.weight.device.type != "meta":
            bottleneck.to(owner.weight.device, owner.weight.dtype)
        self.lora_bottleneck[adapter_name] = bottleneck
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is a nonlinear bottleneck: it cannot be merged into weights")

    def forward(self, hidden_states):
        if self.disable_adapters:
            return hidden_states
        for name in self.active_adapters:
            if name in self.lora_bottleneck:
                hidden_states = hidden_states + self.lora_bottleneck[name](hidden_states)
        return hidden_states


class AdapterHost(_BlockOutputHost):
    bottleneck_class = Bottleneck


class CompacterHost(_BlockOutputHost):
    bottleneck_class = CompacterBottleneck


def _apply_hosts(module, args, output):
    for name in (ADAPTER_HOST, COMPACTER_HOST):
        host = module._modules.get(name)
        if host is not None:
            output = host(output)
    return output


def attach_pet_hosts(encoder):
    """Give every attention and feed-forward block output of `encoder` its (empty) Adapter and Compacter hosts.

    Returns the number of block outputs hosted (0 without PEFT, or for an encoder of another layout). The hosts hold
    no parameters until PEFT adds an adapter, so state dicts and outputs are unchanged."""
    if not PEFT_AVAILABLE:
        return 0
    hosted = 0
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(BLOCK_OUTPUT_SUFFIXES) and ADAPTER_HOST not in module._modules:
            module.add_module(ADAPTER_HOST, AdapterHost(module))
            module.add_module(COMPACTER_HOST, CompacterHost(module))
            module.register_forward_hook(_apply_hosts)
            hosted += 1
    return hosted


__all__ = ["ADAPTER_HOST", "COMPACTER_HOST", "PEFT_AVAILABLE", "AdapterHost", "Bottleneck", "CompacterBottleneck",
           "CompacterHost", "attach_pet_hosts", "kronecker_sum"]
