"""Command-line helpers shared by the pipelines: Beam option checking and user-error exits.

Each pipeline parses its own arguments and hands every other option to Beam. Beam itself only
warns about an option it does not know, so a mistyped flag (`--alpah 0.05`) would be dropped
while the job runs with the default; `split_beam_options` turns that into an error naming the
flag. `exit_on_user_error` turns the errors a user can fix (a bad pattern, a missing checkpoint)
into one clear line and exit status 2, instead of a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

# Errors a user causes and can fix from the message alone.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def beam_option_names() -> list[str]:
    """Returns every option string of Beam's registered `PipelineOptions` subclasses."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for options_class in _subclasses(PipelineOptions):
        options_class._add_argparse_args(parser)
    return sorted(parser._option_string_actions)


def split_beam_options(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """Parses the pipeline's own arguments; returns them and the remaining Beam options.

    Exits through `parser.error` (status 2) when an option is neither the pipeline's nor Beam's,
    suggesting the closest known names.
    """
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    args, rest = parser.parse_known_args(argv)
    beam_parser = _BeamArgumentParser(allow_abbrev=False)
    for options_class in _subclasses(PipelineOptions):
        options_class._add_argparse_args(beam_parser)
    _, unknown = beam_parser.parse_known_args(rest)
    flags = [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
    if flags or unknown:
        known = list(parser._option_string_actions) + list(beam_parser._option_string_actions)
        known = [name for name in known if name not in ("-h", "--help")]
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag, known, n=2)
            if close:
                hints.append(f"{flag}: did you mean {' or '.join(close)}?")
        parser.error(
            f"unrecognized arguments (neither this pipeline's nor Beam's): {' '.join(unknown)}"
            + ("; " + "; ".join(hints) if hints else "")
        )
    return args, rest


def exit_on_user_error(main: Callable[..., object]) -> Callable[..., int]:
    """Wraps a pipeline's `main` into an exit status: 2 for a user error, which is logged in
    one line instead of a traceback; `main`'s own status if it returns an int; else 0."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            status = main(*args, **kwargs)
        except USER_ERRORS as error:
            if not logging.getLogger().handlers:
                logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
            logging.getLogger(main.__module__).error("%s: %s", type(error).__name__, error)
            return 2
        return status if isinstance(status, int) else 0

    return wrapper


def quiet_beam_logging() -> None:
    """Keeps Beam's INFO chatter (type-hint conversions, batch statistics) out of job logs."""
    logging.getLogger("apache_beam").setLevel(logging.WARNING)


def _subclasses(cls: type) -> set[type]:
    found = set()
    for subclass in cls.__subclasses__():
        found.add(subclass)
        found |= _subclasses(subclass)
    return found
