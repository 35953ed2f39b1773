"""Soak run: tiny stage 2 trains for thousands of steps on data with damage of every kind.

    python bench/soak.py --out runs/soak [--stories 400 --share 0.05 --epochs 40]

A synthetic world is made, then about ``share`` of its train records are damaged, one kind each,
every kind of :mod:`datamodules.records` in turn (a cut JSON line, bytes that are not UTF-8, a
missing field, images and captions of unequal length, one frame, an empty caption, an image
path that does not exist, a folder, an empty file, and truncated image files), and as many
again are rewritten the way other tools write them (byte-order mark, CRLF, ``./`` and ``\\``
paths), which must be read. ``train.py fit`` then runs the tiny stage-2 config (a smaller LLM,
same classes) on it to the last step, and the table compares, for every epoch, the logged
``data/skipped_<kind>`` with what was injected. Exit status 1 if any count differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import yaml  # noqa: E402

from datamodules import records, synthetic  # noqa: E402
from lightning_modules.components.story_llm import LLMSpec  # noqa: E402
from lightning_modules.language_model import export_untrained  # noqa: E402
from tools.cli import cli_main, config_command  # noqa: E402

DAMAGE = [records.MALFORMED_JSON, records.NON_UTF8, records.MISSING_FIELD, records.LENGTH_MISMATCH,
          records.TOO_FEW_FRAMES, records.EMPTY_CAPTION, records.MISSING_IMAGE, records.NOT_A_FILE,
          records.EMPTY_IMAGE, records.UNREADABLE_IMAGE]


def damage_record(record: dict, kind: str, images: Path, rng: random.Random) -> bytes:
    """The jsonl line of ``record`` with one damage of ``kind`` (image damage goes to copies)."""
    frame = rng.randrange(len(record["images"]))
    spoiled = Path("soak_damage") / str(record["id"])
    (images / spoiled).mkdir(parents=True, exist_ok=True)
    if kind == records.MALFORMED_JSON:
        line = json.dumps(record).encode()
        return line[: len(line) // 2]
    if kind == records.NON_UTF8:
        record["captions"][frame] = "PLACEHOLDER"
        return json.dumps(record).encode().replace(b"PLACEHOLDER", b"caf\xe9")
    if kind == records.MISSING_FIELD:
        del record["captions"]
    elif kind == records.LENGTH_MISMATCH:
        record["captions"] = record["captions"][:-1]
    elif kind == records.TOO_FEW_FRAMES:
        for key in ("images", "captions", "characters"):
            record[key] = record[key][:1]
    elif kind == records.EMPTY_CAPTION:
        record["captions"][frame] = "  "
    elif kind == records.MISSING_IMAGE:
        record["images"][frame] = str(spoiled / "nowhere.png")
    elif kind == records.NOT_A_FILE:
        (images / spoiled / "a_folder.png").mkdir(exist_ok=True)
        record["images"][frame] = str(spoiled / "a_folder.png")
    elif kind == records.EMPTY_IMAGE:
        (images / spoiled / "empty.png").write_bytes(b"")
        record["images"][frame] = str(spoiled / "empty.png")
    elif kind == records.UNREADABLE_IMAGE:
        # every frame truncated: whatever chunk an epoch draws from this story fails once, when decoded
        for i, ref in enumerate(record["images"]):
            data = (images / ref).read_bytes()
            (images / spoiled / f"{i}.png").write_bytes(data[: len(data) // 2])
            record["images"][i] = str(spoiled / f"{i}.png")
    return json.dumps(record).encode()


def as_other_tools_write(record: dict) -> bytes:
    """A valid record as a Windows editor or a spreadsheet export writes it: BOM, ``.\\`` paths, spaces."""
    record["images"] = [".\\" + ref.replace("/", "\\") for ref in record["images"]]
    record["exported_by"] = "spreadsheet"
    return records.BOM + json.dumps(record).encode() + b"  \t"


def make_damaged_world(out: Path, stories: int, share: float, seed: int, size: int) -> tuple[Path, Counter, int, int]:
    """The world, its damaged train split, what was injected by kind, the usable train stories and
    the number of records rewritten as other tools write them."""
    files = synthetic.generate(out, stories, seed, (size, size))
    rng = random.Random(seed)
    lines = files["train"].read_text().splitlines()
    chosen = rng.sample(range(len(lines)), k=2 * max(len(DAMAGE), round(share * len(lines))))
    damaged, rewritten = chosen[: len(chosen) // 2], chosen[len(chosen) // 2:]
    injected: Counter = Counter()
    out_lines = [line.encode() for line in lines]
    for i, index in enumerate(damaged):
        kind = DAMAGE[i % len(DAMAGE)]
        out_lines[index] = damage_record(json.loads(lines[index]), kind, out / "images", rng)
        injected[kind] += 1
    for index in rewritten:
        out_lines[index] = as_other_tools_write(json.loads(lines[index]))
    files["train"].write_bytes(b"\r\n".join(out_lines) + b"\r\n\r\n")  # CRLF and a trailing blank line, too
    usable = len(lines) - len(damaged) + injected[records.UNREADABLE_IMAGE]  # those pass setup, fail when decoded
    return files["train"], injected, usable, len(rewritten)


def logged_skips(metrics_csv: Path) -> list[dict[str, float]]:
    """The ``data/skipped_<kind>`` values of each epoch, from the CSV logger."""
    epochs: dict[int, dict[str, float]] = {}
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key.startswith("data/skipped_") and value:
                    epochs.setdefault(int(row["epoch"]), {})[key.removeprefix("data/skipped_")] = float(value)
    return [epochs[e] for e in sorted(epochs)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/soak")
    parser.add_argument("--stories", type=int, default=400)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    if out.exists():
        sys.exit(f"{out} exists: remove it or pass another --out")
    train, injected, usable, rewritten = make_damaged_world(out / "world", args.stories, args.share, args.seed, args.size)
    world = train.parent
    steps = args.epochs * math.ceil(usable / args.batch_size)
    # a smaller LLM than the tiny one (the same classes), untrained, and a smaller ViT view: thousands of steps
    # in minutes on 2 cores; its tokenizer learns the clean stories' captions (the damaged file is what is read)
    tiny = yaml.safe_load((ROOT / "configs/tiny/language_model.yaml").read_text())["model"]["init_args"]["llm"]
    small = LLMSpec(config={**tiny["config"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2})
    llm = export_untrained(small, [str(world / "val.jsonl"), str(world / "test.jsonl")], out / "llm")
    started = time.perf_counter()
    cli = cli_main([
        *config_command(ROOT / "configs/tiny/stage2_mllm.yaml"),
        f"--data.init_args.train_files={train}", f"--data.init_args.val_files={world / 'val.jsonl'}",
        f"--data.init_args.test_files={world / 'test.jsonl'}", f"--data.init_args.image_root={world / 'images'}",
        "--data.init_args.synthetic=null", f"--data.init_args.image_size={args.size}", "--data.init_args.max_images=4",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--model.init_args.llm.path={llm}", f"--model.init_args.story_format.tokenizer={llm}", f"--model.init_args.export_dir={out / 'export'}",
        "--model.init_args.vision_encoder.image_size=32",
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0",
        "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=50",
        f"--trainer.default_root_dir={out / 'run'}",
        f"--trainer.logger={{'class_path': 'callbacks.loggers.RunCSVLogger', 'init_args': {{'save_dir': '{out / 'run'}'}}}}",
    ])
    minutes = (time.perf_counter() - started) / 60
    per_epoch = logged_skips(next((out / "run").rglob("metrics.csv")))

    print(f"\nsoak: {cli.trainer.global_step} of {steps} steps, {len(per_epoch)} epochs of {usable} usable train stories "
          f"({args.stories} made, {sum(injected.values())} damaged, {rewritten} rewritten as other tools write them), "
          f"{minutes:.1f} min, final train loss {float(cli.trainer.callback_metrics.get('train/loss', float('nan'))):.3f}\n")
    print("| kind | injected | logged per epoch (min - max) | equal every epoch |")
    print("|---|---|---|---|")
    ok = cli.trainer.global_step == steps and len(per_epoch) == args.epochs
    for kind in sorted(set(injected) | {k for epoch in per_epoch for k in epoch}):
        counts = [epoch.get(kind, 0.0) for epoch in per_epoch]
        equal = all(c == injected[kind] for c in counts)
        ok &= equal
        print(f"| {kind} | {injected[kind]} | {min(counts):.0f} - {max(counts):.0f} | {'yes' if equal else 'NO'} |")
    print(f"\n{'every counter equals what was injected' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
