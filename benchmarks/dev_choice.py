"""Which of two candidate methods the dev split (SOTU 2000-2009) chose for a setting, from the committed records.

The shell drivers (``benchmarks/float_formats.sh``, ``benchmarks/float_inputs.sh``) run two methods on the dev
split, then score only the winner's recipe on the test split. The rule is one: the alternative wins when its
newest full-protocol dev-split perplexity is below ``(1 - margin)`` x the base's; a missing record never wins.

    python -m benchmarks.dev_choice w4a4-nvfp4 gptq rot-gptq                       # prints gptq or rot-gptq
    python -m benchmarks.dev_choice nvfp4 rtn rtn-mse --margin 0.01 --pick gptq,gptq-mse
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import _common as common


def dev_perplexities(setting: str, path: Path) -> dict[str, float]:
    """``{method: ppl}`` of the newest ok, full-protocol dev-split records of ``setting`` in ``path``."""
    out: dict[str, float] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            protocol = r.get("protocol") or {}
            if (r.get("setting") == setting and protocol.get("split") == "dev" and not protocol.get("quick")
                    and r.get("status") == "ok" and r.get("ppl") is not None):
                out[r["method"]] = r["ppl"]  # later lines are newer
    return out


def choose(dev: dict[str, float], base: str, alt: str, margin: float = 0.0) -> bool:
    """True when ``alt`` beats ``base`` on the dev split by more than ``margin`` (a fraction of base's ppl)."""
    return alt in dev and (base not in dev or dev[alt] < (1 - margin) * dev[base])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setting")
    parser.add_argument("base", help="the method kept unless the alternative wins")
    parser.add_argument("alt", help="the alternative")
    parser.add_argument("--margin", type=float, default=0.0, help="how much lower the alternative must be (fraction)")
    parser.add_argument("--pick", default=None, help="names to print for base,alt (default: the methods)")
    parser.add_argument("--records", type=Path, default=common.RESULTS / f"{common.BENCH}.jsonl")
    args = parser.parse_args(argv)
    names = args.pick.split(",") if args.pick else [args.base, args.alt]
    if len(names) != 2:
        parser.error("--pick takes two names: for base, for alt")
    won = choose(dev_perplexities(args.setting, args.records), args.base, args.alt, args.margin)
    print(names[1] if won else names[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
