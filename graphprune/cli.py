"""graphprune-cli: apply a recipe to a model from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from graphprune.errors import GraphPruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Token reduction for transformers as a compiler pass.")
err_console = Console(stderr=True)
console = Console()


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
    if path.suffix in (".pt2",):
        if not path.is_file():
            _fail(f"no such file: {path}")
        try:
            return torch.export.load(str(path)).module()
        except Exception as err:  # noqa: BLE001
            _fail(f"{path} is not a readable torch.export program ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
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
            _fail(f"cannot load {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
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
        model.load_state_dict(read_state_dict(weights))
    return model


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
        _fail(f"cannot read weights from {path} (safetensors or a weights-only state dict): {str(err).splitlines()[0]}")


@app.command()
def export(
    model: str = typer.Argument(..., help="timm model name, a .pt2 exported program, or a pickled module (.pt, needs --trust-pickle)"),
    recipe: str = typer.Option(..., "--recipe", help="recipe name (see 'graphprune-cli recipes')"),
    target: str = typer.Option("eager", "--target", help="eager (writes model.pt2) or onnx (writes model.onnx)"),
    output: Path = typer.Option(..., "-o", "--output", help="output folder"),
    r: Optional[str] = typer.Option(None, "--r", help="tome: tokens merged per block, or a comma-separated per-block list"),
    inflection: Optional[float] = typer.Option(None, "--inflection", help="tome: ramp the schedule (r, inflection)"),
    prop_attn: Optional[bool] = typer.Option(None, "--prop-attn/--no-prop-attn", help="tome: proportional attention"),
    keep: Optional[float] = typer.Option(None, "--keep", help="evit: fraction of tokens kept"),
    locations: Optional[str] = typer.Option(None, "--locations", help="evit: comma-separated block indices"),
    restore_tokens: Optional[bool] = typer.Option(None, "--restore-tokens/--no-restore-tokens", help="per-token outputs at the original token count (default) or reduced, with sizes"),
    option: list[str] = typer.Option([], "--option", "-O", help="any recipe option as KEY=VALUE (VALUE parsed as JSON when it can be, e.g. -O counts=[10,10,8])"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="weights for a timm model: .safetensors or a weights-only state dict"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow loading a pickled model (runs code from the file)"),
    batch: int = typer.Option(2, "--batch", min=1, help="example batch size used for capture and checks"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="example input shape C,H,W (default: the model's)"),
):
    """Optimize MODEL with a recipe and write the artifact plus report.json into the output folder."""
    try:
        import graphprune
        import torch

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
        for item in option:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                _fail(f"--option takes KEY=VALUE, got '{item}'")
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value
        if target not in ("eager", "onnx", "trt"):
            _fail(f"unknown target '{target}'; choose eager, onnx or trt")
        graphprune.recipes.get_recipe(recipe, **options)  # bad recipe or options: fail before loading anything
        from graphprune.exporters.files import ensure_dir

        if output.exists() and not output.is_dir():
            _fail(f"output {output} exists and is not a folder")
        ensure_dir(output)
        net = load_model(model, weights, trust_pickle)
        example = None
        if input_size is not None:
            try:
                shape = tuple(int(v) for v in input_size.split(","))
            except ValueError:
                _fail(f"--input-size takes C,H,W, got '{input_size}'")
            example = (torch.randn(batch, *shape),)
        elif batch != 2:
            from graphprune.api import default_example_inputs

            example = tuple(t[:1].expand(batch, *t.shape[1:]).clone() for t in default_example_inputs(net))
        with console.status(f"optimizing {model} with {recipe}…"):
            if target == "onnx":
                result = graphprune.optimize(net, recipe, target="onnx", example_inputs=example, output=output / "model.onnx", **options)
            else:
                result = graphprune.optimize(net, recipe, target=target, example_inputs=example, **options)
                result.report.artifact = str(result.save(output / "model.pt2"))
        report = result.report
        from graphprune.exporters.files import atomic_path

        with atomic_path(output / "report.json") as tmp:
            Path(tmp).write_text(report.to_json())
        console.print(report.table())
        console.print(f"wrote {report.artifact} and {output / 'report.json'}")
    except GraphPruneError as err:
        _fail(str(err))


@app.command()
def recipes(as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """List the recipes and their options."""
    from graphprune.recipes import RECIPES

    if as_json:
        print(json.dumps({n: {"summary": c.summary, "paper": c.paper, "options": c.describe_options()} for n, c in sorted(RECIPES.items())}, indent=2))
        return
    t = Table(title="graphprune recipes")
    t.add_column("recipe")
    t.add_column("what it does")
    t.add_column("options (default)")
    for name, cls in sorted(RECIPES.items()):
        opts = "\n".join(f"{o} ({d}): {h}" for o, d, h in cls.describe_options())
        t.add_row(name, f"{cls.summary}\n[dim]{cls.paper}[/]", opts)
    console.print(t)


def main() -> None:
    try:
        app()
    except GraphPruneError as err:  # raised outside a command's own handler
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
