"""The data subcommands of ``gwtn``: shard writers for every dataset, tokenizer training.

    gwtn shards fashion-mnist OUT [--src DIR]  MNIST-format idx files → (npy, cls) shards
    gwtn shards imagefolder SRC OUT           ImageNet-style class folders → (jpg, cls) shards
    gwtn shards wikipedia DUMP… OUT           pages-articles XML(.bz2) or JSON lines → token shards
    gwtn shards text FILE… OUT                plain UTF-8 text → token shards
    gwtn shards synthetic imagenet|wikipedia OUT  random data in the real datasets' shapes
    gwtn tokenizer train FILE… --out PATH     a BERT WordPiece tokenizer (tokenizers library)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .fashion_mnist import write_fashion_mnist
from .imagefolder import write_imagefolder_shards
from .synthetic import write_synthetic_images, write_synthetic_tokens
from .text_shards import iter_texts, write_text_shards
from .tokenizer import train_tokenizer


def _print_index(index: dict, out: str) -> None:
    for split, info in index["splits"].items():
        reasons = ", ".join(f"{n} {r}" for r, n in info["skipped_by_reason"].items())
        extra = f", {info['tokens']} tokens" if "tokens" in info else ""
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s){extra}; "
              f"skipped {info['skipped']}" + (f" ({reasons})" if reasons else ""))
    print(f"wrote {Path(out) / 'index.json'}")


def _cmd_fashion_mnist(args: argparse.Namespace) -> None:
    index = write_fashion_mnist(Path(args.out), Path(args.src) if args.src else None)
    for split, info in index["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s)")
    print(f"wrote {Path(args.out) / 'index.json'}")


def _cmd_imagefolder(args: argparse.Namespace) -> None:
    index = write_imagefolder_shards(args.src, args.out, workers=args.workers,
                                     maxcount=args.shard_size, seed=args.seed,
                                     progress=not args.quiet)
    _print_index(index, args.out)


def _cmd_text(args: argparse.Namespace) -> None:
    index = write_text_shards(args.inputs, args.out, seq_len=args.seq_len,
                              tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                              val_every=args.val_every, test_every=args.test_every,
                              workers=args.workers,
                              maxcount=args.shard_size, progress=not args.quiet)
    _print_index(index, args.out)


def _cmd_synthetic(args: argparse.Namespace) -> None:
    if args.kind == "imagenet":
        index = write_synthetic_images(args.out, train=args.train, val=args.val, seed=args.seed)
    else:
        index = write_synthetic_tokens(args.out, train=args.train, val=args.val, test=args.val,
                                       seq_len=args.seq_len, vocab_size=args.vocab_size,
                                       seed=args.seed)
    _print_index(index, args.out)


def _cmd_tokenizer(args: argparse.Namespace) -> None:
    tok = train_tokenizer(lambda: iter_texts(args.inputs), args.vocab_size, args.out,
                          progress=not args.quiet)
    print(f"wrote {args.out} ({tok.get_vocab_size()} tokens)")


def _common(p: argparse.ArgumentParser, shard_size: int) -> None:
    p.add_argument("--workers", type=int, default=1, help="writer processes (default 1)")
    p.add_argument("--shard-size", type=int, default=shard_size,
                   help=f"samples per shard (default {shard_size})")


def _text_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--tokenizer", help="a tokenizer.json to use (default: train one on the input "
                                       "and save it as OUT/tokenizer.json)")
    p.add_argument("--vocab-size", type=int, default=30522,
                   help="vocabulary of the trained tokenizer (default 30522, BERT's)")
    p.add_argument("--val-every", type=int, default=100,
                   help="one document in N (chosen by a hash of its number) goes to the val split; "
                        "0: no val (default 100)")
    p.add_argument("--test-every", type=int, default=100,
                   help="one document in N (never a val one) goes to the test split, read only for "
                        "reports; 0: no test (default 100)")
    _common(p, 10_000)
    p.set_defaults(func=_cmd_text)


def add_shard_commands(kinds: argparse._SubParsersAction) -> None:
    """Register ``fashion-mnist``, ``imagefolder``, ``wikipedia`` and ``text`` under
    ``gwtn shards``."""
    p = kinds.add_parser("fashion-mnist", help="Fashion-MNIST idx files → shards")
    p.add_argument("out", help="output folder")
    p.add_argument("--src", help="folder of MNIST-format idx files (default: Debian's package)")
    p.set_defaults(func=_cmd_fashion_mnist)

    p = kinds.add_parser("imagefolder", help="class folders of images (train/, val/) → shards")
    p.add_argument("src", help="folder with train/<class>/* and/or val/<class>/*")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    _common(p, 1000)
    p.set_defaults(func=_cmd_imagefolder)

    p = kinds.add_parser("wikipedia", help="pages-articles dump or JSON lines → token shards")
    p.add_argument("inputs", nargs="+", metavar="DUMP",
                   help="*-pages-articles*.xml[.bz2], or *.jsonl[.bz2] with a text field")
    _text_options(p)

    p = kinds.add_parser("text", help="plain UTF-8 text files → token shards")
    p.add_argument("inputs", nargs="+", metavar="FILE",
                   help="text files (a paragraph = a document)")
    _text_options(p)

    p = kinds.add_parser("synthetic", help="random shards in ImageNet's or Wikipedia's shapes "
                                           "(for rehearsing a real-size run)")
    p.add_argument("kind", choices=["imagenet", "wikipedia"])
    p.add_argument("out", help="output folder")
    p.add_argument("--train", type=int, default=64, help="training samples (default 64)")
    p.add_argument("--val", type=int, default=16,
                   help="held-out samples (val, and test for wikipedia; default 16)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="wikipedia: tokens per sequence (default 128, as `gwtn shards wikipedia`)")
    p.add_argument("--vocab-size", type=int, default=30522,
                   help="wikipedia: vocabulary (default 30522, BERT's)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=_cmd_synthetic)


def add_tokenizer_command(sub: argparse._SubParsersAction) -> None:
    """Register ``gwtn tokenizer train``."""
    p = sub.add_parser("tokenizer", help="train a WordPiece tokenizer")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="train on text files, XML dumps or JSON lines")
    t.add_argument("inputs", nargs="+", metavar="FILE")
    t.add_argument("--out", required=True, help="where to save tokenizer.json")
    t.add_argument("--vocab-size", type=int, default=30522, help="default 30522")
    t.set_defaults(func=_cmd_tokenizer)
