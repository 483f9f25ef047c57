"""The options a request may set, declared per pipeline: the one registry of what `pipeline_options` may hold.

Each option names the pipeline it is passed to, its type, the values it may take and its
default. A request's options are checked against this at save (model validation), again by
the flow before it submits anything (rows can be written around the model), and in part by a
database CHECK constraint (the options are a JSON object holding none of the reserved names).

Names reach the pipeline exactly as declared, as `--<name> <value>`: no `_` to `-` rewriting,
since Nextflow parameters are matched by their exact name.

Some names are the orchestrator's own: it sets the pipeline's inputs and outputs, and Nextflow's
launch options (`-c`, `-profile`, `-params-file`, `-work-dir`, `-resume`, `-with-trace`, ...) decide
where a job reads and writes. A request naming one is refused, whatever pipeline declares what.
"""

import re
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError

NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

# Names the orchestrator sets itself (pipeline inputs and outputs) and Nextflow's own launch and
# configuration options. Compared without leading dashes and with `_` and `-` treated alike, so
# neither `work_dir` nor `-work-dir` gets through.
RESERVED_NAMES = frozenset(
    {
        "outdir",
        "output",
        "output_dir",
        "samplesheet",
        "input",
        "contigs",
        "reads",
        "work_dir",
        "workdir",
        "w",
        "c",
        "config",
        "profile",
        "params_file",
        "resume",
        "with_trace",
        "with_report",
        "with_timeline",
        "with_dag",
        "with_tower",
        "with_weblog",
        "with_notification",
        "with_docker",
        "with_singularity",
        "with_conda",
        "with_apptainer",
        "with_podman",
        "with_charliecloud",
        "without_docker",
        "bucket_dir",
        "bg",
        "log",
        "name",
        "r",
        "revision",
        "hub",
        "user",
        "latest",
        "main_script",
        "entry",
        "dump_channels",
        "dump_hashes",
        "stub",
        "stub_run",
        "preview",
        "plugins",
        "process",
        "e",
        "env",
        "ansi_log",
        "lib",
        "cache",
        "qs",
        "queue_size",
        "offline",
        "trace",
        "report",
        "timeline",
        "dag",
        "publish_dir_mode",
        "custom_config_base",
        "custom_config_version",
        "config_profile_name",
        "tracedir",
        "help",
    }
)
# The JSON keys the database CHECK constraint refuses: the reserved names as a request would spell them.
RESERVED_KEYS = tuple(sorted(RESERVED_NAMES | {name.replace("_", "-") for name in RESERVED_NAMES}))


def normalised(name: str) -> str:
    return name.lstrip("-").replace("-", "_").lower()


@dataclass(frozen=True)
class Option:
    name: str
    pipeline: str
    type: type
    default: Any
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: tuple | None = None
    odd: bool = False
    help: str = ""

    def check(self, value: Any) -> None:
        """Raise a ValidationError naming this option if `value` is not one it may take."""
        params = {"name": self.name, "value": value}
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidationError(
                    "Pipeline option %(name)r must be an integer, not %(value)r.",
                    code="invalid_option_type",
                    params=params,
                )
        elif self.type is float:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value != value
                or value in (float("inf"), float("-inf"))
            ):
                raise ValidationError(
                    "Pipeline option %(name)r must be a finite number, not %(value)r.",
                    code="invalid_option_type",
                    params=params,
                )
        elif self.type is str:
            if not isinstance(value, str) or "\x00" in value:
                raise ValidationError(
                    "Pipeline option %(name)r must be a string, not %(value)r.",
                    code="invalid_option_type",
                    params=params,
                )
        if self.choices is not None and value not in self.choices:
            raise ValidationError(
                "Pipeline option %(name)r must be one of %(choices)s, not %(value)r.",
                code="invalid_option_choice",
                params={**params, "choices": ", ".join(map(repr, self.choices))},
            )
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise ValidationError(
                "Pipeline option %(name)r must be between %(minimum)s and %(maximum)s, not %(value)r.",
                code="option_out_of_range",
                params={**params, "minimum": self.minimum, "maximum": self.maximum},
            )
        if self.odd and value % 2 == 0:
            raise ValidationError(
                "Pipeline option %(name)r must be odd, not %(value)r.", code="option_out_of_range", params=params
            )


# The assembly pipeline (pipelines/assembly.py; in production the assembly Nextflow pipeline).
OPTIONS: dict[str, Option] = {
    option.name: option
    for option in (
        Option("k", "assembly", int, 21, minimum=11, maximum=127, odd=True, help="k-mer length of the de Bruijn graph"),
        Option(
            "min_contig_length",
            "assembly",
            int,
            200,
            minimum=1,
            maximum=1_000_000,
            help="shortest contig kept, in bases",
        ),
    )
}


def validate_pipeline_options(value) -> None:
    """Options reach the pipeline as `--name value` arguments: a JSON object of declared names and valid values."""
    if not isinstance(value, dict):
        kind = "null" if value is None else type(value).__name__
        raise ValidationError(
            "Pipeline options must be a JSON object of option name to value ({} for none), not %(kind)s.",
            code="invalid_options",
            params={"kind": kind},
        )
    errors = []
    for name, option_value in value.items():
        try:
            check_option(name, option_value)
        except ValidationError as error:
            errors.append(error)
    if errors:
        raise ValidationError(errors)


def check_option(name, value) -> None:
    if not isinstance(name, str):
        raise ValidationError(
            "Pipeline option name %(name)r must be a string.", code="invalid_option_name", params={"name": name}
        )
    if normalised(name) in RESERVED_NAMES:
        raise ValidationError(
            "Pipeline option %(name)r is set by the orchestrator itself (inputs, outputs, Nextflow's launch and "
            "configuration options) and cannot be given in a request.",
            code="reserved_option",
            params={"name": name},
        )
    if not NAME.fullmatch(name):
        raise ValidationError(
            "Pipeline option name %(name)r must be lowercase letters, digits and underscores.",
            code="invalid_option_name",
            params={"name": name},
        )
    option = OPTIONS.get(name)
    if option is None:
        raise ValidationError(
            "Unknown pipeline option %(name)r; the options are: %(known)s.",
            code="unknown_option",
            params={"name": name, "known": ", ".join(sorted(OPTIONS))},
        )
    option.check(value)


def resolved_options(pipeline: str, options: dict) -> dict[str, Any]:
    """Every option of `pipeline`, in declaration order, with the request's value or the default.

    Defaults are spelled out, so a request that leaves an option unset and one that sets it to
    its default run the same command: one job, one fingerprint.
    """
    validate_pipeline_options(options)
    return {name: options.get(name, option.default) for name, option in OPTIONS.items() if option.pipeline == pipeline}


def option_arguments(options: dict[str, Any]) -> list[str]:
    """`--name value` arguments, names exactly as declared (each value one argument, never shell text)."""
    arguments = []
    for name, value in options.items():
        arguments += [f"--{name}", str(value)]
    return arguments
