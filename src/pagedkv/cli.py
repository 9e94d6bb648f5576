"""The ``pagedkv`` command line: ``demo``, ``generate``, ``explain``, ``manager-demo``,
``snapshot``."""

from __future__ import annotations

import functools
import inspect
import os
import shutil
from collections.abc import Callable
from dataclasses import Field
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pagedkv.engine.config import EngineConfig, limits_text, option_fields, option_type
from pagedkv.snapshot.cli import app as snapshot_app

app = typer.Typer(
    help="pagedkv: paged KV cache for LLM inference.", no_args_is_help=True, add_completion=False
)
console = Console()
app.add_typer(snapshot_app, name="snapshot")


def _print_version(value: bool) -> None:
    if value:
        from pagedkv import __version__

        console.print(f"pagedkv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """pagedkv: paged KV cache for LLM inference."""


def _engine_option(f: Field[Any]) -> inspect.Parameter:
    """The typer option of an EngineConfig field: its default and help, and a check that
    is the config's own (so a bad value is refused, naming the flag, before anything
    is loaded)."""
    kind, optional = option_type(f)
    limits = limits_text(f)
    help = f.metadata["help"] + (f" Must be {limits}." if limits and kind is not str else "")

    def check(value: Any) -> Any:
        try:
            EngineConfig(**{f.name: value})
        except (TypeError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from None
        return value

    opt = typer.Option(help=escape(help), callback=check, rich_help_panel="Engine options")
    # the field's type, known only at run time: mypy cannot check a computed annotation
    annotation = Annotated[kind | None if optional else kind, opt]  # type: ignore[valid-type]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                             annotation=annotation)  # fmt: skip


def engine_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command one ``--flag`` per :class:`EngineConfig` field (those the CLI can
    express: not ``preemption``, whose ``"swap"`` needs tiers) with the field's default
    and help; the command receives them as one ``config: EngineConfig``."""
    fields_ = [f for f in option_fields() if f.metadata["cli"]]
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "config"]

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        config = EngineConfig(**{f.name: kwargs.pop(f.name) for f in fields_})
        command(**kwargs, config=config)

    params = own + [_engine_option(f) for f in fields_]
    # inspect (and typer) read __signature__ off any callable; typeshed declares none
    cast(Any, run).__signature__ = signature.replace(parameters=params)
    return run


def _manager_demo() -> None:
    from pagedkv.manager import demo

    demo.run()


@app.command()
@engine_options
def demo(
    manager: Annotated[
        bool, typer.Option("--manager", help="Run the block-manager-only demo instead.")
    ] = False,
    conversations: Annotated[
        int, typer.Option(min=1, help="Chats sharing the system prompt.")
    ] = 32,
    turns: Annotated[int, typer.Option(min=1, help="User turns per chat.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 32,
    model: Annotated[str | None, typer.Option(help="Local model directory.")] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda if present).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16.")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics while the demo "
            "runs (0: a free port; needs pagedkv[metrics]).",
        ),
    ] = None,
    *,
    config: EngineConfig,
) -> None:
    """Multi-turn chats on the default model (SmolLM2-135M-Instruct) with prefix caching."""
    if manager:
        _manager_demo()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pagedkv.engine import Engine
    from pagedkv.engine.chat_demo import run_chat_demo

    with console.status("loading the model (the first run converts the GGUF once)..."):
        engine = Engine.from_pretrained(model, device=device, dtype=dtype, config=config)
    console.print(
        f"model [bold]{engine.model.config.model_type}[/] on {engine.device} "
        f"({engine.model.dtype}); KV pool: {engine.cache.num_blocks} blocks x "
        f"{engine.cache.block_size} tokens"
    )
    server = None
    if metrics_port is not None:
        from pagedkv.metrics import serve_for

        server = serve_for(engine, metrics_port)
        console.print(f"Prometheus metrics at {server.url}")
    columns = (TextColumn("chat turns"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("turns", total=conversations * turns)
            report = run_chat_demo(
                engine, conversations=conversations, turns=turns, max_new_tokens=max_new_tokens,
                progress=lambda done, total: bar.update(task, completed=done),
            )  # fmt: skip
    finally:
        if server is not None:
            server.close()
    for question, answer in report.samples:
        console.print(f"[bold cyan]Q:[/] {question}\n[bold green]A:[/] {answer.strip()}\n")
    mib = report.bytes_per_block / 2**20
    table = Table(title="pagedkv demo")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("requests (chat turns)", f"{report.requests}"),
        ("prompt tokens", f"{report.prompt_tokens:,}"),
        ("tokens served from the prefix cache", f"{report.cached_tokens:,}"),
        ("prefill tokens computed", f"{report.prefill_tokens:,}"),
        ("generated tokens", f"{report.generated_tokens:,}"),
        ("generated tokens/s", f"{report.tokens_per_s:,.1f}"),
        ("wall time", f"{report.seconds:.1f} s"),
        ("KV blocks peak (paged)", f"{report.blocks_peak} ({report.blocks_peak * mib:.0f} MiB)"),
        (
            "KV blocks a dense per-request cache holds",
            f"{report.dense_blocks_peak} ({report.dense_blocks_peak * mib:.0f} MiB)",
        ),
        ("preemptions", f"{report.preemptions}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


@app.command("manager-demo")
def manager_demo() -> None:
    """Block-manager-only demo (no model): allocation, prefix sharing, eviction."""
    _manager_demo()


@app.command()
@engine_options
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    model: Annotated[
        str | None, typer.Option(help="Local model directory (default: SmolLM2-135M-Instruct).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="In (0, 1]; 1.0 = off.")] = 1.0,
    seed: Annotated[int | None, typer.Option(min=0, max=2**64 - 1)] = None,
    chat: Annotated[bool, typer.Option(help="Wrap prompts in the chat template.")] = True,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option()] = None,
    *,
    config: EngineConfig,
) -> None:
    """Generate answers for PROMPTs with a local model."""
    from pagedkv.engine import Engine, SamplingParams

    try:
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed,
        )  # fmt: skip
        engine = Engine.from_pretrained(model, device=device, dtype=dtype, config=config)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    tok = engine.tokenizer
    if tok is None:
        console.print(
            f"[red]error:[/] {escape(str(model))} has no tokenizer, so text prompts cannot be "
            "encoded; save the tokenizer beside the model (tokenizer.save_pretrained(dir))"
        )
        engine.close()
        raise typer.Exit(2)
    chat = chat and bool(getattr(tok, "chat_template", None))
    try:
        outputs = engine.generate(list(prompt), params, chat=chat)
    except ValueError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    for p, out in zip(prompt, outputs):
        text = out.text if out.text is not None else " ".join(map(str, out.token_ids))
        console.print(f"[bold cyan]>[/] {p}\n{text.strip()}\n")


@app.command()
@engine_options
def explain(
    prompt: Annotated[str, typer.Argument(help="The prompt whose cache hits to explain.")],
    model: Annotated[
        str | None, typer.Option(help="Local model directory (default: SmolLM2-135M-Instruct).")
    ] = None,
    disk_tier: Annotated[
        str | None, typer.Option(help="A DiskTier directory a pagedkv cache wrote.")
    ] = None,
    redis_tier: Annotated[
        str | None, typer.Option(help="A RedisTier URL (redis://, rediss://).")
    ] = None,
    salt: Annotated[str | None, typer.Option(help="The requests' cache_salt.")] = None,
    model_version: Annotated[
        str | None, typer.Option(help="The model_version the serving engine was given.")
    ] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = True,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str | None, typer.Option()] = None,
    *,
    config: EngineConfig,
) -> None:
    """Which blocks of PROMPT the tiers hold (for a new process: its device cache is empty).

    Reads only: the tiers are asked, nothing is written or evicted. The model, its
    dtype, --block-size, --model-version and --salt must be the serving engine's, or
    every block reads never_seen (another fingerprint is another namespace)."""
    from dataclasses import replace

    from pagedkv.engine import Engine
    from pagedkv.engine.chat import chat_prompt_ids
    from pagedkv.explain import explain_report
    from pagedkv.tiers import DiskTier, RedisTier

    tiers: list[Any] = []
    if disk_tier is not None:  # the capacity bounds writes only, and explain writes nothing
        tiers.append(DiskTier(disk_tier, _disk_bytes(disk_tier)))
    if redis_tier is not None:
        tiers.append(RedisTier(redis_tier))
    config = replace(config, num_blocks=config.num_blocks or 1)  # the device holds nothing
    try:
        engine = Engine.from_pretrained(
            model, device=device, dtype=dtype, config=config, tiers=tiers or None,
            model_version=model_version,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    with engine:
        tok = engine.tokenizer
        if chat and tok is not None and getattr(tok, "chat_template", None):
            ids = chat_prompt_ids(tok, prompt)
        elif tok is not None:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in prompt.replace(",", " ").split()]  # a model without one
        console.print(escape(explain_report(engine.cache, ids, salt)), highlight=False)


def _disk_bytes(path: str) -> int:
    """The size of the file system holding ``path`` (or its nearest existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).total


def main() -> None:
    """Entry point of the ``pagedkv`` script."""
    from pagedkv._extras import MissingDependencyError

    try:
        app()
    except MissingDependencyError as e:  # one line naming the extra, not a traceback
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
