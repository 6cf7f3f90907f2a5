"""The modes a LoRA training pass runs in, each a context that leaves the model as it found it: bf16 autocast, frozen
weights held in bf16, gradient checkpointing, the attention kernel and compiled decoder layers (``LoraLearner.epoch``
enters all five)."""
import shutil
from contextlib import contextmanager

import torch


def autocast(device, bf16):
    device = torch.device(device)
    enabled = device.type == "cuda" or bool(bf16)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextmanager
def frozen_weights_as(model, dtype):
    """Frozen floating-point weights held in ``dtype`` inside the block and restored bit for bit after it: autocast
    would otherwise re-cast every frozen weight in every step. LoRA weights (trainable) keep their dtype."""
    saved = []
    if dtype is not None:
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                saved.append((p, p.data))
                p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


@contextmanager
def checkpointing(model, enabled):
    """Gradient checkpointing inside the block (recompute each layer's activations in backward; scoring after it
    needs the key/value cache, which checkpointing turns off)."""
    if not enabled:
        yield
        return
    # transformers >= 5 names it activation checkpointing (the old name warns); older versions have only the old name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


ATTENTION_KERNELS = ("sdpa", "eager")


@contextmanager
def attention_kernel(model, name):
    """Every attention layer dispatches to ``name`` inside the block (None: unchanged); the model's own after it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = getattr(base.config, "_attn_implementation", None)
    if name is None or name == own:
        yield
        return
    _set_attention(base, name)
    try:
        yield
    finally:
        _set_attention(base, own)


def _set_attention(model, name):
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.54
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


COMPILE_MIN_PROMPTS = 128  # auto: compiling costs ~30 s here (cold cache) and pays for itself after ~60 prompts


def compiler_found(device):
    """Whether torch.compile's backend can build kernels here: a C++ compiler on CPU, triton on CUDA."""
    if torch.device(device).type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def compile_wanted(setting, device, n_prompts):
    """``train_compile`` resolved: True / False as given; auto = a compiler is found and the module trains on at
    least COMPILE_MIN_PROMPTS prompts (a short run would spend more on compiling than it saves)."""
    if setting == "auto":
        return n_prompts >= COMPILE_MIN_PROMPTS and compiler_found(device)
    return bool(setting)


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


@contextmanager
def compiled_layers(model, enabled, fallback=False):
    """Each decoder layer runs through torch.compile (dynamic shapes: one compiled layer serves every prompt length
    and, with its weights as inputs, every layer and every LoRA) inside the block; plain layers after it, so scoring
    and saving see the model as it was. It fuses the element-wise work and casts around the matmuls (benchmarks/
    llm_profile.py). ``fallback``: a layer torch cannot compile runs uncompiled instead of failing (auto mode)."""
    layers = decoder_layers(model) if enabled else []
    if not layers:
        yield
        return
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        with torch._dynamo.config.patch(suppress_errors=bool(fallback)):
            yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: back to the plain forward
