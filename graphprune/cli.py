"""graphprune-cli: apply a recipe to a model from the command line."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from graphprune.capture import SHORTEST
from graphprune.errors import GraphPruneError, first_line
from graphprune.exporters.files import removed_on_failure

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Token reduction for transformers as a compiler pass.")
err_console = Console(stderr=True)
console = Console()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


def _parse_r(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"--r takes an integer or a comma-separated list of integers, got '{text}'")
    return values[0] if len(values) == 1 else values


def load_model(spec: str, weights: Optional[Path], trust_pickle: bool):
    """A timm model name, a .pt2 exported program, or (with --trust-pickle) a pickled module."""
    import torch

    from graphprune.errors import UntrustedFileError

    path = Path(spec)
    if path.suffix == ".gguf":
        return load_hf_decoder(path)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_folder(path)
    if path.suffix in (".pt2",):
        return load_exported(path)
    if path.is_dir():
        _fail(f"{path} is a folder without config.json: give a Hugging Face model folder (config.json and .safetensors "
              "weights), a .gguf, .pt2 or pickled model file, or a timm model name")
    if path.suffix in (".pt", ".pth", ".pkl", ".bin") or path.exists():
        if not path.is_file():
            _fail(f"no such file: {path}")
        if not trust_pickle:
            raise UntrustedFileError(
                f"{path} is a pickled model: loading it runs arbitrary code from the file. Pass --trust-pickle only "
                "if you trust its source, or give a timm model name with --weights (safetensors / weights-only state dict)"
            )
        try:
            model = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            _fail(f"cannot load {path}: {first_line(err)}")
        if not isinstance(model, torch.nn.Module):
            _fail(f"{path} holds a {type(model).__name__}, not a torch.nn.Module (a state dict goes with --weights)")
        return model
    import timm

    if not timm.is_model(spec):
        import difflib

        close = difflib.get_close_matches(spec, timm.list_models(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        _fail(f"'{spec}' is neither a file nor a timm model name.{hint}")
    model = timm.create_model(spec, pretrained=False)
    if weights is not None:
        load_weights(model, spec, weights)
    return model


def load_exported(path: Path):
    """The module of a ``.pt2`` file written by ``torch.export.save`` (or ``graphprune-cli export``)."""
    import warnings
    import zipfile

    import torch

    if not path.is_file():
        _fail(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        _fail(f"{path} is not an exported program: a .pt2 file is the zip archive torch.export.save writes "
              "(graphprune-cli export writes one as model.pt2)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path)).module()
    except Exception as err:  # noqa: BLE001
        _fail(f"{path} is not a readable torch.export program ({first_line(err)})")


def load_weights(model, name: str, weights: Path) -> None:
    """Load ``--weights`` into ``model``; one clear error naming a few keys when they do not fit."""
    state = read_state_dict(weights)
    if not isinstance(state, dict):
        _fail(f"{weights} holds a {type(state).__name__}, not a state dict (parameter name -> tensor)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (the model's: {tuple(own[k].shape)})" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]

    def few(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    problems = [f"{len(missing)} missing ({few(missing)})"] if missing else []
    problems += [f"{len(unexpected)} unexpected ({few(unexpected)})"] if unexpected else []
    problems += [f"{len(shapes)} of another shape ({few(shapes)})"] if shapes else []
    if problems:
        _fail(f"the weights in {weights} do not fit {name}: " + "; ".join(problems) + ". Give the state dict of this "
              "architecture (the keys of model.state_dict())")
    try:
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot load the weights in {weights} into {name}: {first_line(err)}")


def load_hf_decoder(path: Path):
    """A Hugging Face causal LM (or vision-language model) from a local folder (config.json + safetensors) or a .gguf
    file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if not path.exists():
        _fail(f"no such file: {path}")
    try:
        if path.suffix == ".gguf":
            import torch

            return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        vision = hasattr(AutoConfig.from_pretrained(str(path)), "vision_config")
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        return auto.from_pretrained(str(path), use_safetensors=True).eval()
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot load a causal LM or vision-language model from {path} (a folder with config.json and "
              f".safetensors weights, or a .gguf file): {first_line(err)}")


GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def load_hf_folder(path: Path):
    """A Hugging Face model folder: a causal LM or vision-language model (:func:`load_hf_decoder`), else an encoder
    (ViT, DINOv2, CLIP's or SigLIP's vision tower, BERT, RoBERTa, ...) as the class its config.json names."""
    import transformers
    from transformers import AutoConfig, AutoModel, PreTrainedModel

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot read the Hugging Face config in {path}: {first_line(err)}")
    names = getattr(config, "architectures", None) or []
    if not names or hasattr(config, "vision_config") or any(n.endswith(GENERATIVE) for n in names):
        return load_hf_decoder(path)
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        cls = AutoModel
    try:
        return cls.from_pretrained(str(path), use_safetensors=True).eval()
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot load {names[0]} from {path} (a folder with config.json and .safetensors weights): "
              f"{first_line(err)}")


def takes_token_ids(net) -> bool:
    """A Hugging Face text encoder (BERT, RoBERTa, ...): its forward takes token ids and no pixels."""
    import inspect

    try:
        params = inspect.signature(net.forward).parameters
    except (TypeError, ValueError):
        return False
    return "input_ids" in params and "pixel_values" not in params and hasattr(net, "config")


def is_vlm(net) -> bool:
    return hasattr(getattr(net, "config", None), "vision_config")


def image_prompts(model: str, data: Optional[Path], batch: int) -> tuple:
    """A vision-language model's prompts, from its processor: ``batch`` images (the first of --data, a folder of
    images; else random pixels) each with one question, left-padded. Returns (input_ids, attention_mask, the other
    inputs)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model)
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot load the processor of {model} (its images and prompts are built with it): {first_line(err)}")
    if data is not None:
        if not data.is_dir():
            _fail(f"--data for a vision-language model is a folder of images; {data} is not a folder")
        files = sorted(p for p in data.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < batch:
            _fail(f"{data} has {len(files)} images; --batch {batch} needs {batch}")
        images = [Image.open(p).convert("RGB") for p in files[:batch]]
    else:
        g = np.random.default_rng(0)
        images = [Image.fromarray((g.random((336, 336, 3)) * 255).astype("uint8")) for _ in range(batch)]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}]
    try:
        text = processor.apply_chat_template(chat, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001
        _fail(f"the processor of {model} has no usable chat template: {first_line(err)}")
    processor.tokenizer.padding_side = "left"
    out = dict(processor(images=images, text=[text] * batch, return_tensors="pt", padding=True))
    ids, mask = out.pop("input_ids"), out.pop("attention_mask")
    return ids, mask, out


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = Path(spec)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot load the tokenizer of {path} for --data: {first_line(err)}")


def text_batches(model: str, data: Optional[Path], vocab: int, batch: int, prompt_len: int, new_tokens: int):
    """(prompts, continuations) for a decoder: token windows of --data (a text file) or random tokens."""
    import torch

    if data is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab, (batch, prompt_len), generator=g), None
    if not data.is_file():
        _fail(f"no such text file: {data}")
    ids = load_tokenizer(model)(data.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    span = prompt_len + new_tokens
    if len(ids) < batch * span:
        _fail(f"{data} has {len(ids)} tokens; --batch {batch} windows of {prompt_len}+{new_tokens} need {batch * span}")
    windows = ids[: batch * span].reshape(batch, span)
    return windows[:, :prompt_len], windows[:, prompt_len:]


def read_state_dict(path: Path) -> dict:
    import torch

    if not path.is_file():
        _fail(f"no such weights file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot read weights from {path} (safetensors or a weights-only state dict): {first_line(err)}")


# options shared by the commands that apply a recipe
ModelArg = Annotated[str, typer.Argument(help="timm model name, a .pt2 exported program, a Hugging Face model folder "
                                             "(config.json and safetensors: an encoder such as ViT or BERT, a causal LM "
                                             "or a vision-language model), a .gguf file, or a pickled module (.pt, needs "
                                             "--trust-pickle)")]
PromptLenOpt = Annotated[int, typer.Option("--prompt-len", min=1, help="decoder LLMs: prompt tokens (ONNX exports take this length)")]
NewTokensOpt = Annotated[int, typer.Option("--new-tokens", min=1, help="decoder LLMs: tokens generated / decoded per prompt")]
ROpt = Annotated[Optional[str], typer.Option("--r", help="tome: tokens merged per block, or a comma-separated per-block list")]
InflectionOpt = Annotated[Optional[float], typer.Option("--inflection", help="tome: ramp the schedule (r, inflection)")]
PropAttnOpt = Annotated[Optional[bool], typer.Option("--prop-attn/--no-prop-attn", help="tome: proportional attention")]
KeepOpt = Annotated[Optional[float], typer.Option("--keep", help="evit and others: fraction of tokens kept")]
LocationsOpt = Annotated[Optional[str], typer.Option("--locations", help="evit and others: comma-separated block indices")]
RestoreOpt = Annotated[Optional[bool], typer.Option(
    "--restore-tokens/--no-restore-tokens", help="per-token outputs at the original token count (default) or reduced, with sizes")]
OptionOpt = Annotated[list[str], typer.Option(
    "--option", "-O", help="any recipe option as KEY=VALUE (VALUE parsed as JSON when it can be, e.g. -O counts=[10,10,8])")]
ScheduleOpt = Annotated[Optional[Path], typer.Option("--schedule", help="a schedule file from 'graphprune-cli tune' (recipe and per-block options)")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="weights for a timm model: .safetensors or a weights-only state dict")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow loading a pickled model (runs code from the file)")]
InputSizeOpt = Annotated[Optional[str], typer.Option("--input-size", help="input shape C,H,W (default: the model's)")]
LengthsOpt = Annotated[Optional[str], typer.Option(
    "--lengths", help="text encoders: the sequence lengths served, comma-separated (default 128, or the model's "
    "longest if shorter). ToMe captures one graph for every length up to the longest; other recipes one length per "
    "export")]
DEFAULT_LENGTH = 128


def recipe_options(r, inflection, prop_attn, keep, locations, restore_tokens, option) -> dict:
    """The recipe options given on the command line (only those given)."""
    options = {}
    if r is not None:
        options["r"] = _parse_r(r)
    if inflection is not None:
        if not isinstance(options.get("r"), int):
            _fail("--inflection needs a single integer --r")
        options["r"] = (options["r"], inflection)
    if prop_attn is not None:
        options["prop_attn"] = prop_attn
    if keep is not None:
        options["keep"] = keep
    if locations is not None:
        try:
            options["locations"] = [int(v) for v in locations.split(",") if v.strip()]
        except ValueError:
            _fail(f"--locations takes comma-separated block indices, got '{locations}'")
    if restore_tokens is not None:
        options["restore_tokens"] = restore_tokens
    return {**options, **key_values(option)}


def key_values(option: list[str]) -> dict:
    """``--option KEY=VALUE`` items as a dict (VALUE parsed as JSON when it can be)."""
    options = {}
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--option takes KEY=VALUE, got '{item}'")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def resolve_recipe(recipe: Optional[str], schedule: Optional[Path], options: dict) -> tuple[str, dict]:
    """Recipe and options from --recipe / --schedule, validated before any model is loaded."""
    import graphprune
    from graphprune.schedule.files import resolve

    if recipe is None and schedule is None:
        _fail("give --recipe NAME or --schedule FILE")
    recipe, options = resolve(recipe, schedule, options)
    graphprune.recipes.get_recipe(recipe, **options)  # bad recipe or options: fail before loading anything
    return recipe, options


def text_length(net, lengths: Optional[list[int]]) -> int:
    """The length a text encoder is captured at: the longest of --lengths, by default 128 or the model's longest if
    shorter."""
    limit = getattr(net.config, "max_position_embeddings", None) or DEFAULT_LENGTH
    n = max(lengths) if lengths else min(DEFAULT_LENGTH, limit)
    if n > limit:
        _fail(f"--lengths {n}: this model takes at most {limit} tokens")
    return n


def example_inputs(net, batch: int, input_size: Optional[str], lengths: Optional[list[int]] = None):
    """(batch, C, H, W) random images: of --input-size, or of the model's own size. A text encoder: random token ids
    of the longest of --lengths (default 128, or the model's longest if shorter) and their attention mask."""
    import torch

    from graphprune.api import default_example_inputs

    if takes_token_ids(net):
        if input_size is not None:
            _fail("--input-size is for image models; a text model takes --lengths")
        config, n = net.config, text_length(net, lengths)
        ids = torch.randint(0, config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(0))
        pad = getattr(config, "pad_token_id", None)
        if pad is not None:  # real tokens only (RoBERTa numbers positions from the non-padding ones)
            ids[ids == pad] = (pad + 1) % config.vocab_size
        return ids, torch.ones_like(ids)
    if lengths is not None:
        _fail("--lengths is for text models (token ids); image models take --input-size")
    if input_size is None:
        shape = default_example_inputs(net)[0].shape[1:]
    else:
        try:
            shape = tuple(int(v) for v in input_size.split(","))
        except ValueError:
            _fail(f"--input-size takes C,H,W, got '{input_size}'")
    return (torch.randn(batch, *shape),)


@app.command()
def export(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="output folder")],
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="recipe name (see 'graphprune-cli recipes')")] = None,
    target: Annotated[str, typer.Option("--target", help="eager (writes model.pt2), onnx (writes model.onnx), trt "
                                        "(model.onnx plus the TensorRT engine build: build_engine.sh/.py, and "
                                        "model.plan where TensorRT is installed) or openvino (model.onnx plus the "
                                        "OpenVINO IR model.xml/.bin, checked on the CPU)")] = "eager",
    r: ROpt = None, inflection: InflectionOpt = None, prop_attn: PropAttnOpt = None, keep: KeepOpt = None,
    locations: LocationsOpt = None, restore_tokens: RestoreOpt = None, option: OptionOpt = [],  # noqa: B006
    schedule: ScheduleOpt = None, weights: WeightsOpt = None, trust_pickle: TrustOpt = False,
    batch: Annotated[int, typer.Option("--batch", min=1, help="example batch size used for capture and checks")] = 2,
    input_size: InputSizeOpt = None, lengths: LengthsOpt = None, prompt_len: PromptLenOpt = 128,
    new_tokens: NewTokensOpt = 64,
):
    """Optimize MODEL with a recipe and write the artifact plus report.json into the output folder.

    Text encoders (a Hugging Face BERT or RoBERTa folder) serve the --lengths given. Decoder LLMs take a KV-cache
    recipe (-O budget=...): --target onnx writes prefill.onnx and decode.onnx; --target eager writes the recipe as a
    schedule file to pass back with --schedule."""
    with removed_on_failure(output):
        _export(model, output, recipe, target, r, inflection, prop_attn, keep, locations, restore_tokens, option,
                schedule, weights, trust_pickle, batch, input_size, parse_lengths(lengths), prompt_len, new_tokens)


def parse_lengths(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        _fail(f"--lengths takes comma-separated token counts, e.g. 128,512; got '{text}'")
    if values[0] < SHORTEST:
        _fail(f"--lengths: every length is at least {SHORTEST} tokens; got {values[0]}")
    return values


def length_options(net, recipe: str, options: dict, lengths: Optional[list[int]]) -> dict:
    """``lengths=`` for a text encoder: ToMe (one graph with a symbolic length) serves every length up to the longest;
    another recipe exports one graph at the one length given."""
    import graphprune
    from graphprune.buckets import one_graph

    if not takes_token_ids(net):
        return {}
    lengths = lengths or [text_length(net, None)]
    if one_graph(graphprune.recipes.get_recipe(recipe, **options)):
        return {"lengths": lengths}
    if len(lengths) > 1:
        _fail(f"'{recipe}' fixes its token counts when optimized, so an export serves one length: give one --lengths "
              "value per export (ToMe serves every length up to the longest in one graph)")
    return {}


def _export(model, output, recipe, target, r, inflection, prop_attn, keep, locations, restore_tokens, option, schedule,
            weights, trust_pickle, batch, input_size, lengths, prompt_len, new_tokens):
    try:
        import graphprune

        if target not in ("eager", "onnx", "trt", "openvino", "triton"):
            _fail(f"unknown target '{target}'; choose eager, onnx, trt, openvino or triton")
        recipe, options = resolve_recipe(recipe, schedule, recipe_options(r, inflection, prop_attn, keep, locations, restore_tokens, option))
        from graphprune.exporters.files import ensure_dir, write_text

        if output.exists() and not output.is_dir():
            _fail(f"output {output} exists and is not a folder")
        ensure_dir(output)
        net = load_model(model, weights, trust_pickle)
        from graphprune.kv import is_decoder_lm

        if is_decoder_lm(net):
            return export_decoder(net, model, recipe, options, target, output, batch, prompt_len, new_tokens)
        example = example_inputs(net, batch, input_size, lengths)
        options = {**options, **length_options(net, recipe, options, lengths)}
        with console.status(f"optimizing {model} with {recipe}…"):
            if target in ("onnx", "trt", "openvino"):
                result = graphprune.optimize(net, recipe, target=target, example_inputs=example, output=output / "model.onnx", **options)
            elif target == "triton":  # the repository OUTPUT, the model's folder named after the model
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(model)).stem) or "model"
                result = graphprune.optimize(net, recipe, target=target, example_inputs=example, output=output / name, **options)
            else:
                result = graphprune.optimize(net, recipe, target=target, example_inputs=example, **options)
                result.report.artifact = str(result.save(output / "model.pt2"))
        report = result.report
        write_text(output / "report.json", report.to_json())
        console.print(report.table())
        console.print(f"wrote {report.artifact} and {output / 'report.json'}")
        if takes_token_ids(net):
            n = example[0].shape[1]
            console.print(f"it takes {SHORTEST} to {n} tokens" if "lengths" in options else
                          f"it takes {n} tokens (--lengths)")
        if target == "trt":
            console.print(f"wrote {output / 'build_engine.sh'} (trtexec) and {output / 'build_engine.py'} (TensorRT's "
                          f"Python builder), with the profile in {output / 'profile.json'}; {report.engine_note}")
    except GraphPruneError as err:
        _fail(str(err))


def export_decoder(net, model: str, recipe: str, options: dict, target: str, output: Path, batch: int, prompt_len: int,
                   new_tokens: int) -> None:
    import json

    import graphprune
    from graphprune.exporters.files import write_text
    from graphprune.schedule.files import Schedule

    if target in ("trt", "openvino", "triton"):
        _fail(f"decoder LLMs export to ONNX (--target onnx); {target} for decoders is not built yet: convert "
              "prefill.onnx and decode.onnx with its own tools")
    ids, _ = text_batches(model, None, net.config.get_text_config().vocab_size, batch, prompt_len, 1)
    with console.status(f"optimizing {model} with {recipe}…"):
        result = graphprune.optimize(net, recipe, target=target, output=output if target == "onnx" else None,
                                     example_inputs=None if is_vlm(net) else ids, max_new_tokens=new_tokens, **options)
    report = result.report.to_dict()
    if target == "onnx":
        report["artifact"] = str(output)
        report["onnx"] = result.meta
        from graphprune.exporters.vision_onnx import OnnxImageReducer

        if isinstance(result, OnnxImageReducer):
            console.print(f"wrote {output / 'vision.onnx'}: pixels to the image tokens the recipe keeps (checked in ONNX "
                          "Runtime; the language model runs eager)")
        elif is_vlm(net):  # (the whole model)
            console.print(f"wrote {output / 'vision.onnx'}, {output / 'prefill.onnx'}, {output / 'decode.onnx'} "
                          "(checked against eager generation)")
        else:
            console.print(f"wrote {output / 'prefill.onnx'}, {output / 'decode.onnx'} (checked against eager "
                          "generation)")
    else:
        path = Schedule(recipe, options, {"model": model}).save(output / "schedule.json")
        report["artifact"] = str(path)
        console.print(f"wrote {path}: pass it back with --schedule, or graphprune.optimize(model, schedule=...)")
    write_text(output / "report.json", json.dumps(report, indent=2, default=str))
    console.print(f"wrote {output / 'report.json'}")


def load_data(path: Path, net, input_size: Optional[str]):
    """Inputs for fidelity: a folder of images (resized to the model's input), or a tensor file (.npy, .pt, .safetensors)."""
    import numpy as np
    import torch

    if not path.exists():
        _fail(f"no such data: {path}")
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            _fail(f"{path} holds no images (.png, .jpg, .jpeg, .bmp, .webp)")
        c, h, w = example_inputs(net, 1, input_size)[0].shape[1:]
        mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        images = []
        for f in files:
            img = Image.open(f).convert("RGB").resize((w, h), Image.BICUBIC)
            images.append((torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std)
        return torch.stack(images)[:, :c]
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False)).float()
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return next(iter(load_file(str(path)).values())).float()
        return torch.load(str(path), map_location="cpu", weights_only=True).float()
    except Exception as err:  # noqa: BLE001
        _fail(f"cannot read inputs from {path} (a folder of images, .npy, .safetensors or a tensor saved with torch.save): "
              f"{first_line(err)}")


def model_and_batches(model: str, weights, trust_pickle: bool, batch: int, input_size, data, net=None):
    """The model (eval mode), a random timing batch, and --data split into batches (None without it)."""
    import torch

    net = (net if net is not None else load_model(model, weights, trust_pickle)).eval()
    torch.manual_seed(0)
    timed = example_inputs(net, batch, input_size)
    if data is None:
        return net, timed, None
    x = load_data(data, net, input_size)
    return net, timed, [(x[i: i + batch],) for i in range(0, len(x), batch)]


def load_labels(path: Path):
    import numpy as np
    import torch

    if not path.is_file():
        _fail(f"no such labels file: {path}")
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False)).long().reshape(-1)
        return torch.tensor([int(v) for v in path.read_text().split()])
    except (ValueError, OSError) as err:
        _fail(f"cannot read labels from {path} (.npy, or whitespace-separated integers): {err}")


@app.command()
def bench(
    model: ModelArg,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results as JSON")] = None,
    recipe: Annotated[list[str], typer.Option("--recipe", help="recipe name; repeat it with one --sweep each to compare recipes")] = [],  # noqa: B006
    sweep: Annotated[list[str], typer.Option("--sweep", help="sweep a recipe option: r=0:20:2, keep=1.0:0.4:0.1 or r=4,8,13 (one per --recipe)")] = [],  # noqa: B006
    target: Annotated[str, typer.Option("--target", help="eager, onnx (ONNX Runtime) or openvino (OpenVINO, CPU)")] = "eager",
    batch: Annotated[int, typer.Option("--batch", min=1, help="batch size of the timed inputs")] = 8,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="interleaved timing rounds (after warm-up)")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="warm-up rounds")] = 2,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="threads of every runtime: torch, ONNX "
                                                   "Runtime, OpenVINO (default: torch's)")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="fidelity inputs: a folder of images or a tensor file; decoder LLMs: a text file; vision-language models: a folder of images (default: random inputs)")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="labels of --data (.npy or integers): adds accuracy")] = None,
    table_out: Annotated[Optional[Path], typer.Option("--table", help="write the table as Markdown")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="write a PNG of speedup against fidelity")] = None,
    r: ROpt = None, inflection: InflectionOpt = None, prop_attn: PropAttnOpt = None, keep: KeepOpt = None,
    locations: LocationsOpt = None, restore_tokens: RestoreOpt = None, option: OptionOpt = [],  # noqa: B006
    schedule: ScheduleOpt = None, weights: WeightsOpt = None, trust_pickle: TrustOpt = False, input_size: InputSizeOpt = None,
    prompt_len: PromptLenOpt = 512, new_tokens: NewTokensOpt = 32,
    compile_: Annotated[bool, typer.Option("--compile", help="run both the unmodified model and the variants through "
                                                             "torch.compile (eager target)")] = False,
):
    """Speed and fidelity of MODEL optimized with a recipe against the unmodified model (interleaved runs).

    Decoder LLMs: decode speed and KV-cache memory against the full cache, and the fidelity of
    every next-token distribution along a continuation (--data: a text file, else random tokens
    continued greedily)."""
    try:
        from graphprune import bench as gb

        if target not in gb.TARGETS:
            _fail(f"unknown bench target '{target}'; choose {' or '.join(gb.TARGETS)}")
        common = recipe_options(r, inflection, prop_attn, keep, locations, restore_tokens, option)
        if sweep and len(sweep) != max(len(recipe), 1):
            _fail(f"give one --sweep per --recipe ({len(recipe)} recipes, {len(sweep)} sweeps)")
        if len(recipe) > 1 and not sweep:
            _fail("several --recipe options need one --sweep each")
        variants = []
        for i, name in enumerate(recipe or [None]):
            name, options = resolve_recipe(name, schedule if i == 0 else None, common)
            if not sweep:
                variants.append((name, options))
                continue
            key, values = gb.parse_range(sweep[i])
            for v in values:
                resolve_recipe(name, None, {**options, key: v})
                variants.append((name, {**options, key: v}))
        if labels is not None and data is None:
            _fail("--labels needs --data")
        if json_out is not None:
            from graphprune.exporters.files import check_writable

            check_writable(json_out)
        from graphprune.kv import is_decoder_lm

        net = load_model(model, weights, trust_pickle)
        if is_decoder_lm(net):
            from graphprune.kv import bench as kb

            if target != "eager":
                _fail("decoder LLMs are benchmarked in eager mode (their ONNX export is checked token for token by export)")
            if compile_:
                _fail("--compile is for encoders; decoder LLMs are benchmarked with their evicting caches in eager mode")
            if is_vlm(net):  # one image and a question per prompt, through the model's processor
                ids, mask, extra = image_prompts(model, data, batch)
                targets = None
                console.print(f"benchmarking {model}: {len(variants)} variant(s) against the unmodified model, batch "
                              f"{batch}, one image and {ids.shape[1]} tokens per prompt, {new_tokens} decode steps")
            else:
                (ids, targets), mask, extra = text_batches(model, data, net.config.get_text_config().vocab_size, batch,
                                                           prompt_len, new_tokens), None, None
                console.print(f"benchmarking {model}: {len(variants)} variant(s) against the full cache, batch {batch}, "
                              f"{prompt_len}-token prompts, {new_tokens} decode steps")
            results = kb.bench_decoder(net, variants, ids, mask, targets=targets, new_tokens=new_tokens, rounds=rounds,
                                       warmup=warmup, inputs=extra)
            return _write_bench(results, model, target, batch, rounds, data, json_out, table_out, plot_out,
                                kb.table, kb.markdown, metric="top1_agreement")
        net, timed, fid_data = model_and_batches(model, weights, trust_pickle, batch, input_size, data, net=net)
        y = load_labels(labels) if labels is not None else None
        if y is not None and len(y) != sum(len(d[0]) for d in fid_data):
            _fail(f"{labels} has {len(y)} labels for {sum(len(d[0]) for d in fid_data)} inputs")
        console.print(f"benchmarking {model}: {len(variants)} variant(s) against the unmodified model, {target}, batch {batch}")
        results = gb.sweep(net, variants, timed, target=target, data=fid_data, labels=y, rounds=rounds, warmup=warmup,
                           threads=threads, compile=compile_)
        _write_bench(results, model, target, batch, rounds, data, json_out, table_out, plot_out, gb.table, gb.markdown)
    except GraphPruneError as err:
        _fail(str(err))


def _write_bench(results, model, target, batch, rounds, data, json_out, table_out, plot_out, table, markdown,
                 metric: str = "cosine") -> None:
    from graphprune import bench as gb
    from graphprune.exporters.files import write_text

    title = f"{model} · {target} · batch {batch}"
    console.print(table(results, title=title))
    if json_out is not None:
        payload = {"model": model, "target": target, "batch": batch, "rounds": rounds, "data": str(data) if data else "random inputs",
                   "results": [r.to_dict() for r in results]}
        if len(results) == 1:
            payload.update(results[0].to_dict())  # speedup, flop_ratio, fidelity at the top level
        console.print(f"wrote {write_text(json_out, json.dumps(payload, indent=2))}")
    if table_out is not None:
        console.print(f"wrote {write_text(table_out, markdown(results, title=title))}")
    if plot_out is not None:
        console.print(f"wrote {gb.plot(results, plot_out, metric=metric, title=title)}")


@app.command()
def tune(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="schedule file to write (JSON)")],
    recipe: Annotated[str, typer.Option("--recipe", help="recipe whose per-block schedule is tuned (tome)")] = "tome",
    speedup: Annotated[Optional[float], typer.Option("--speedup", help="goal: this speedup over the unmodified model")] = None,
    latency_ms: Annotated[Optional[float], typer.Option("--latency-ms", help="goal: this latency per batch, in ms")] = None,
    target: Annotated[str, typer.Option("--target", help="runtime the latency table is profiled and the schedule measured on: eager or onnx")] = "eager",
    batch: Annotated[int, typer.Option("--batch", min=1, help="batch size to tune for")] = 8,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="timing rounds (min of N) per profiled block and count")] = 5,
    data: Annotated[Optional[Path], typer.Option("--data", help="calibration inputs for fidelity: a folder of images or a tensor file")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="latency-table cache (default ~/.cache/graphprune/latency)")] = None,
    refresh: Annotated[bool, typer.Option("--rebuild", "--refresh", help="profile again even if a cached table exists "
                                          "(a cached one is also profiled again when the unmodified model's time now "
                                          "differs from it by more than 1.3x)")] = False,
    option: OptionOpt = [],  # noqa: B006
    weights: WeightsOpt = None, trust_pickle: TrustOpt = False, input_size: InputSizeOpt = None,
):
    """Choose a per-block schedule meeting --speedup or --latency-ms with the best fidelity, by profiling this device."""
    try:
        with removed_on_failure(output.parent):  # (the folder check_writable makes for the schedule file)
            import graphprune

            if (speedup is None) == (latency_ms is None):
                _fail("give one goal: --speedup X or --latency-ms Y")
            if recipe not in graphprune.schedule.tune.TUNABLE:
                graphprune.recipes.get_recipe(recipe)  # unknown recipe: its own error
                _fail(f"tune chooses per-block schedules for {', '.join(graphprune.schedule.tune.TUNABLE)}; '{recipe}' has none")
            options = graphprune.schedule.tune.check_options(recipe, key_values(option))  # before loading the model
            from graphprune.exporters.files import check_writable

            check_writable(output)
            net, timed, calibration = model_and_batches(model, weights, trust_pickle, batch, input_size, data)
            schedule = graphprune.tune(net, recipe, speedup=speedup, latency_ms=latency_ms, example_inputs=timed, calibration=calibration,
                                       target=target, rounds=rounds, cache_dir=cache_dir, refresh=refresh, options=options)
            info = schedule.info
            console.print(info["latency_table"], highlight=False)
            t = Table(title=f"{model} · {recipe} schedules at {info['goal']}")
            for col in ("schedule", "family", "predicted ms", "cosine"):
                t.add_column(col, justify="left" if col in ("schedule", "family") else "right")
            for c in sorted(info["candidates"], key=lambda c: -c["cosine"]):
                mark = "★ " if c["r"] == schedule.options["r"] else "  "
                t.add_row(mark + ",".join(map(str, c["r"])), c["family"], f"{c['predicted_ms']:.2f}", f"{c['cosine']:.4f}")
            console.print(t)
            console.print(f"unmodified model {info['baseline_ms']:.2f} ms; chosen schedule predicted {info['predicted_ms']:.2f} ms "
                          f"({info.get('predicted_speedup', info['baseline_ms'] / info['predicted_ms']):.2f}×)"
                          + (f", measured {info['measured_speedup']:.2f}× (prediction off by {100 * info['prediction_error']:+.1f} %)"
                             if "measured_speedup" in info else ""))
            if "within_noise" in info:
                w = info["within_noise"]
                console.print(f"kept the constant schedule: the best-scoring one ({w['family']}) beat it by {w['gain']:+.4f} ± "
                              f"{w['stderr']:.4f}, within the calibration data's noise (more --data resolves smaller gains)")
            console.print(f"wrote {schedule.save(output)}")
    except GraphPruneError as err:
        _fail(str(err))


@app.command()
def serve(
    path: Annotated[Path, typer.Argument(help="an exported model: ONNX or OpenVINO file or folder, or a Triton "
                                              "repository entry")],
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="replicas (Ray Serve)")] = 1,
    port: Annotated[int, typer.Option("--port", help="HTTP port")] = 8000,
    host: Annotated[str, typer.Option("--host", help="HTTP host")] = "127.0.0.1",
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="dynamic batching: most samples "
                                                "per batch")] = 8,
    cpus: Annotated[float, typer.Option("--cpus", help="CPUs per replica")] = 1.0,
):
    """Serve PATH over HTTP on Ray Serve until interrupted: POST one sample as JSON ({"inputs": [...]}; a model of
    several inputs, such as a text encoder: {"inputs": {"input_ids": [...], "attention_mask": [...]}}) or a .npy body
    (.npz: one array per input name) to http://HOST:PORT/; the answer is {"outputs": [...]}, a bad request gets
    {"error": ...} and status 400."""
    import time

    import graphprune
    from graphprune import serving

    try:
        serving.model_file(path)
        graphprune.serve(path, replicas=replicas, max_batch_size=max_batch_size, num_cpus=cpus, port=port, host=host)
    except GraphPruneError as err:
        _fail(str(err))
    console.print(f"serving {path} at http://{host}:{port}/ ({replicas} replica(s), batches of up to "
                  f"{max_batch_size}); Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serving.shutdown()


@app.command()
def recipes(as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """List the recipes and their options."""
    from graphprune.recipes import RECIPES

    def acts_on(cls) -> str:
        if cls.kind == "prompt":
            return "the prompt (text)"
        if cls.kind == "denoiser":
            return "diffusion denoiser tokens"
        if cls.kind != "cache":
            return "encoder tokens"
        if not getattr(cls, "needs_images", False):
            return "decoder KV cache"
        from graphprune.kv.policy import CachePolicy

        return "VLM video tokens" if cls.video_tokens is not CachePolicy.video_tokens else "VLM image tokens"

    if as_json:
        print(json.dumps({n: {"kind": c.kind, "acts_on": acts_on(c), "summary": c.summary, "paper": c.paper,
                              "zero": c.zero, "options": c.describe_options()}
                          for n, c in sorted(RECIPES.items())}, indent=2))
        return
    t = Table(title="graphprune recipes")
    t.add_column("recipe")
    t.add_column("acts on")
    t.add_column("what it does")
    t.add_column("options (default)")
    for name, cls in sorted(RECIPES.items()):
        opts = "\n".join(f"{o} ({d}): {h}" for o, d, h in cls.describe_options())
        t.add_row(name, acts_on(cls), f"{cls.summary}\n[dim]{cls.paper}[/]", opts)
    console.print(t)


def main() -> None:
    try:
        app()
    except GraphPruneError as err:  # raised outside a command's own handler
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
