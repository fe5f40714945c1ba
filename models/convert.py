"""A GGUF dequantised once into a safetensors + tokenizer folder, which loads far faster."""
from __future__ import annotations

from pathlib import Path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    # Imported here: finding and checking a cache needs neither torch nor transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The GGUF quantizer cannot be serialised, and the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
