#!/usr/bin/env python3
"""Next-token agreement of GGUF exports with the merged model, by quantization type.

    python scripts/bench_gguf.py RUN_DIR [--quants f16 q8_0 q5_0 q4_0 q4_k_m] [--examples 8]

RUN_DIR is a finished run with a merged model (e.g. runs/quickstart). For each type this writes
the GGUF the export stage writes, runs the export checks in llama.cpp (teacher-forced top-1
agreement over prepared conversations, tokenization, chat template) and prints the figures with
the file size and the time to write it. The bars in llmtune/stages/gguf_verify.py come from here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q5_0", "q4_0", "q4_k_m"])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    from llmtune import models
    from llmtune.manifest import read_manifest
    from llmtune.stages.export import K_QUANTS, _k_quantize
    from llmtune.stages.export.gguf_verify import MIN_AGREEMENT, verify_gguf
    from llmtune.stages.export.gguf_write import write_gguf
    from llmtune.stages.merge.check import check_rows

    models.quiet_libraries()
    merged = args.run / "merged"
    rows = check_rows(args.run / "adapter", read_manifest(args.run / "adapter"), args.examples, args.tokens)
    model = models.load_model(merged, "fp32").eval()
    tokenizer = models.load_tokenizer(merged)
    print(f"{'type':8s} {'agreement':>9s} {'bar':>5s} {'contexts':>8s} {'tokens':>7s} template  size MB  write s")
    with tempfile.TemporaryDirectory() as folder:
        for quant in args.quants:
            target = Path(folder) / f"{quant}.gguf"
            start = time.perf_counter()
            if quant in K_QUANTS:
                f16 = Path(folder) / "f16-source.gguf"
                write_gguf(merged, f16, "f16", "bench")
                _k_quantize(f16, target, quant)
            else:
                write_gguf(merged, target, quant, "bench")
            seconds = time.perf_counter() - start
            figures = verify_gguf(target, model, tokenizer, rows)
            print(f"{quant:8s} {figures['top1_agreement']:9.2%} {MIN_AGREEMENT[quant]:5.0%} {figures['positions']:8d} "
                  f"{figures['tokenization_matches']:>7s} {str(figures['chat_template_matches']):8s} "
                  f"{target.stat().st_size / 2**20:7.1f} {seconds:8.1f}")
            target.unlink()


if __name__ == "__main__":
    main()
