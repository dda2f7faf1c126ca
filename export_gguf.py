"""Export a GPT-2 model folder to one GGUF file, for llama.cpp, Ollama, LM Studio and anything else that reads GGUF.

    python export_gguf.py --model_path logs/final_model --out model.gguf             # f32
    python export_gguf.py --model_path logs/final_model --out model-q8.gguf --dtype q8_0
    llama-cli -m model.gguf -p "ROMEO:"                                               # (llama.cpp, not run here)

As a library:

    from export_gguf import export_gguf
    path = export_gguf("logs/final_model", "model.gguf", dtype="f16")   # -> Path of the written file

The file is written with the `gguf` package (the GGUF reader/writer maintained in llama.cpp's repository), so no
llama.cpp checkout is needed. It is laid out as llama.cpp's own converter (convert_hf_to_gguf.py, GPT2Model)
writes a GPT2LMHeadModel: architecture `gpt2`; tensors `token_embd`, `position_embd`, `blk.N.attn_norm`,
`blk.N.attn_qkv`, `blk.N.attn_output`, `blk.N.ffn_norm`, `blk.N.ffn_up`, `blk.N.ffn_down`, `output_norm`, with the
Conv1D weights transposed to (out, in); the output layer is tied to `token_embd` (no `output.weight`), which
llama.cpp duplicates on load. Per dtype, as the converter does: f32 writes every tensor in f32; f16 writes the 2-D
weights in f16; q8_0 quantizes them to Q8_0 with `gguf.quants` (a weight whose rows are not a multiple of 32 falls
back to f16, as in the converter); norms, biases and the position embedding stay f32 in every case.

Tokenizer: the vocabulary (byte-level BPE token strings), the merges, token types (NORMAL, CONTROL for
`<|endoftext|>` and other special tokens) and `<|endoftext|>` as BOS/EOS (its id comes from the tokenizer: 50256
for GPT-2's BPE, 0 for train_tokenizer.py's), `tokenizer.ggml.pre = "gpt-2"` (llama.cpp's name for GPT-2's
pre-tokenizer regex, which train_tokenizer.py's tokenizers use too: llama.cpp's converter would have to recognise
their hash, and does not) and `add_bos_token = false` (GPT-2 prepends nothing). Rows of a padded vocabulary
(train.py pads 50257 to 50304) are written as tokens "[PAD<id>]" of type UNUSED, as the converter does, so that
the token list matches the embedding's rows.

Raises GGUFError (a ValueError) for a folder that cannot be exported: not a model, not a GPT-2, a quantize.py
folder (export the fp32 model instead), a tokenizer that is not a byte-level BPE, an unknown dtype. The file is
written beside `out_file` under a temporary name, flushed to disk and renamed into place: it is complete or absent.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import quiet_imports  # noqa: F401, I001  (before transformers)

from atomic import atomic_path, destination_problem
from errors import GPT2ToolkitError, run_main
from model import ModelError, first_line, load_pretrained
from quantize import is_quantized_folder

DTYPES = ("f32", "f16", "q8_0")
ARCH = "gpt2"
PRE_TOKENIZER = "gpt-2"  # llama.cpp (src/llama-vocab.cpp) maps it to LLAMA_VOCAB_PRE_TYPE_GPT2, GPT-2's regex
EOT = "<|endoftext|>"
# GPT-2's tanh-approximated GELU, the one llama.cpp's gpt2 graph computes (ggml_gelu)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Hugging Face name (after "transformer.") -> GGUF name, as gguf's tensor map gives them for MODEL_ARCH.GPT2
_BLOCK_NAMES = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_TOP_NAMES = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
              "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GGUFError(GPT2ToolkitError, ValueError):
    """A model folder or setting that cannot be exported to GGUF; the message says why and what to do."""


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise GGUFError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")


def is_gguf_file(path: Path) -> bool:
    """Whether path starts with GGUF's magic bytes (a file this script may replace)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _check_folder(path: Path) -> None:
    """One-line errors for a quantize.py folder and a folder holding another kind of model, before loading it."""
    if is_quantized_folder(path):
        raise GGUFError(f"{path} is a quantized folder (quantize.py); GGUF export needs the fp32 model: export the folder "
                        "it was quantized from (use --dtype q8_0 for a small file).")
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise GGUFError(f"{config} cannot be read ({first_line(e)}): restore it from the training run's folder.") from None
        if model_type != "gpt2":
            raise GGUFError(f"{path} holds a {model_type!r} model; export_gguf.py exports GPT-2 models (model_type 'gpt2').")


def _check_model(model, name) -> None:
    cfg = model.config
    if type(model).__name__ != "GPT2LMHeadModel" or cfg.model_type != "gpt2":
        raise GGUFError(f"{name}: export_gguf.py exports GPT2LMHeadModel, got {type(model).__name__}.")
    unsupported = [what for what, bad in (
        ("cross-attention", getattr(cfg, "add_cross_attention", False)),
        ("scale_attn_by_inverse_layer_idx", getattr(cfg, "scale_attn_by_inverse_layer_idx", False)),
        ("unscaled attention (scale_attn_weights=False)", not getattr(cfg, "scale_attn_weights", True)),
        (f"activation {cfg.activation_function!r} (llama.cpp's gpt2 computes the tanh GELU)",
         cfg.activation_function not in TANH_GELU),
    ) if bad]
    if unsupported:
        raise GGUFError(f"{name}: llama.cpp's gpt2 architecture has no {', '.join(unsupported)}; this model cannot be exported.")


def _tokenizer_model(tokenizer, name) -> dict:
    """The tokenizer's backend JSON, checked to be a byte-level BPE with GPT-2's regex and no prefix space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(f"{name}: the tokenizer has no fast (tokenizer.json) backend; GGUF export needs a byte-level BPE.")
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    ok = (spec.get("model", {}).get("type") == "BPE" and len(pres) == 1 and pres[0].get("type") == "ByteLevel"
          and pres[0].get("use_regex", True) and not pres[0].get("add_prefix_space", False) and not spec.get("normalizer"))
    if not ok:
        raise GGUFError(f"{name}: the tokenizer is not a GPT-2-style byte-level BPE (ByteLevel pre-tokenizer with GPT-2's regex, "
                        "no prefix space, no normalizer), which is the only kind llama.cpp's 'gpt-2' pre-tokenizer reproduces.")
    return spec


def vocab_entries(tokenizer, vocab_size: int):
    """(tokens, token types, merges, eot id) as llama.cpp's converter writes them for a GPT-2 BPE of `vocab_size` rows."""
    import gguf

    name = getattr(tokenizer, "name_or_path", "the tokenizer")
    spec = _tokenizer_model(tokenizer, name)
    vocab = tokenizer.get_vocab()
    if EOT not in vocab:
        raise GGUFError(f"{name}: the tokenizer has no {EOT} token, which GPT-2 uses as BOS and EOS.")
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(f"{name}: the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows.")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # padding rows (train.py's padded vocabulary), holes in the ids
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges, vocab[EOT]


def _gguf_tensors(model):
    """(GGUF name, fp32 numpy array) of each tensor, in llama.cpp's layout."""
    n_layer = model.config.n_layer
    for hf_name, tensor in model.state_dict().items():
        if not hf_name.startswith("transformer."):
            continue  # lm_head.weight: tied to wte, which llama.cpp duplicates as the output
        name = hf_name[len("transformer."):]
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older checkpoints
        data = tensor.detach().to("cpu").float()
        if name in _TOP_NAMES:
            yield _TOP_NAMES[name], data.numpy()
            continue
        parts = name.split(".", 2)  # h, N, rest
        if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and int(parts[1]) < n_layer and parts[2] in _BLOCK_NAMES:
            if parts[2] in _CONV1D:
                data = data.t()  # Conv1D stores (in, out); llama.cpp expects (out, in) in torch order
            yield f"blk.{parts[1]}.{_BLOCK_NAMES[parts[2]]}", data.contiguous().numpy()
            continue
        raise GGUFError(f"unexpected tensor {hf_name!r} in the model: not a plain GPT-2.")
    if not model.config.tie_word_embeddings:
        yield "output.weight", model.lm_head.weight.detach().to("cpu").float().contiguous().numpy()


def _qtype(name: str, data, dtype: str):
    """The GGML type llama.cpp's converter picks for this tensor at this file dtype."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight" or not name.endswith(".weight"):
        return T.F32
    return {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}[dtype]


def _encode(name, data, qtype):
    import gguf

    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size: the converter's fallback
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, dtype: str = "f32", progress: bool = True) -> Path:
    """Write the GPT-2 in `model_dir` (train.py's final_model, a checkpoint-N folder, a Hugging Face GPT-2) to the GGUF
    file `out_file` at `dtype` ("f32", "f16" or "q8_0"); replaces an existing file atomically. Returns its Path.
    Raises GGUFError for a folder or dtype that cannot be exported, OSError when the file cannot be written."""
    import gguf
    import torch
    from tqdm.auto import tqdm

    check_dtype(dtype)
    src = Path(model_dir).expanduser()
    _check_folder(src)
    out = Path(out_file).expanduser()
    if out.is_dir():
        raise GGUFError(f"{out} is a folder; --out is the GGUF file to write (e.g. {out / 'model.gguf'}).")
    problem = destination_problem(out, folder=False, replaceable=is_gguf_file)
    if problem:  # before loading: never replace the model's weights, a run's notes, ... with a GGUF file
        raise GGUFError(f"--out {out}: {problem}; export_gguf.py replaces only an existing GGUF file: choose another --out.")
    try:
        tokenizer, model = load_pretrained(src if src.exists() else str(model_dir), torch.float32, local_hint="logs/final_model")
    except (FileNotFoundError, ModelError) as e:
        raise GGUFError(str(e)) from None
    _check_model(model, src)
    cfg = model.config
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tokens, types, merges, eot = vocab_entries(tokenizer, n_vocab)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            writer.add_name(src.name or str(model_dir))
            writer.add_block_count(cfg.n_layer)
            writer.add_context_length(cfg.n_positions)
            writer.add_embedding_length(cfg.n_embd)
            writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
            writer.add_head_count(cfg.n_head)
            writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
            writer.add_file_type(ftype)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(PRE_TOKENIZER)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            writer.add_token_merges(merges)
            writer.add_bos_token_id(eot)
            writer.add_eos_token_id(eot)
            writer.add_add_bos_token(False)
            writer.add_add_eos_token(False)
            tensors = list(_gguf_tensors(model))
            for name, data in tqdm(tensors, desc=f"GGUF {dtype}", unit="tensor", disable=not progress):
                data, qtype = _encode(name, data, _qtype(name, data, dtype))
                writer.add_tensor(name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()  # flushes the file: atomic_path then syncs it and renames it into place
    return out


# ----------------------------------------------------------------------------- CLI


@dataclass
class ExportArguments:
    """Export a GPT-2 trained by train.py to one GGUF file for llama.cpp / Ollama / LM Studio (see README, Export to GGUF)."""

    model_path: str = field(default="logs/final_model", metadata={"help": "Model folder to export (train.py's logs/final_model, a checkpoint-N folder; not a quantize.py folder)."})
    out: str | None = field(default=None, metadata={"help": "GGUF file to write; default <model_path>-<dtype>.gguf beside the folder. Replaced atomically if it exists."})
    dtype: str = field(default="f32", metadata={"help": "Weight type: f32 (exact), f16 (half the size), q8_0 (llama.cpp's 8-bit blocks, 8.5 bits a weight). Norms, biases and position embeddings stay f32."})


def parse_args(argv=None) -> ExportArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ExportArguments, description=ExportArguments.__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _run(args), report=(FileNotFoundError,), explain=lambda e: _explain(e, args))


def _run(args) -> None:
    check_dtype(args.dtype)
    src = Path(args.model_path).expanduser()
    out = Path(args.out).expanduser() if args.out else src.with_name(f"{src.name}-{args.dtype}.gguf")
    path = export_gguf(src, out, args.dtype, progress=sys.stderr.isatty())
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB ({args.dtype}, architecture gpt2)")


def _explain(e: BaseException, args) -> str | None:
    if isinstance(e, (GGUFError, ModelError, FileNotFoundError)):
        return first_line(e, 400)
    if isinstance(e, OSError):
        return f"cannot write {e.filename or args.out or 'the output'}: {e.strerror or e}"
    return None


if __name__ == "__main__":
    sys.exit(main())
