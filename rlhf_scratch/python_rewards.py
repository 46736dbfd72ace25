"""``--reward py:FILE.py:FUNCTION`` (or ``py:MODULE:FUNCTION``): a function from your own code as a reward, loaded once,
with every failure (missing file, syntax error, missing function, an exception while scoring) a ``RewardError`` that
names the file, the line and the function."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import traceback
from pathlib import Path

from rlhf_scratch.reward_protocol import RewardError


class PythonFunctionReward:
    """A function from your own code as a reward (``--reward py:FILE.py:FUNCTION`` or ``py:MODULE:FUNCTION``).

    ``FUNCTION(texts)`` (or ``FUNCTION(texts, prompts=prompts)`` when it has a ``prompts`` parameter)
    returns one number per text. The file or module is loaded once, here; a missing file, a syntax
    error, a missing or non-callable function, and any exception the function raises while scoring
    become a RewardError naming the file (and line) and the function. ``score_texts`` checks the
    scores (length, NaN, inf) like every reward's.
    """

    def __init__(self, source: str, function: str):
        self.source, self.function_name = source, function
        self.name = f"py:{source}:{function}"
        self.function = _load_function(source, function)
        self.takes_prompts = "prompts" in inspect.signature(self.function).parameters

    def __call__(self, texts: list[str], prompts: list[str] | None = None):
        try:
            if self.takes_prompts:
                return self.function(texts, prompts=prompts)
            return self.function(texts)
        except Exception as error:  # user code: any exception becomes one message that names it
            raise RewardError(f"The reward function {self.function_name} in {self.source} raised "
                              f"{type(error).__name__}: {error}{_user_frame(error, self.source)}. Fix the function "
                              "(it gets a list of texts and returns one number per text).") from error


def _load_function(source: str, function: str):
    """``function`` from a ``.py`` file (executed once as its own module) or an importable module."""
    where = f"reward {source}:{function}"
    path = Path(source).expanduser()
    _check_python_file(source)
    try:
        if source.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"rlhf_scratch_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
    except ModuleNotFoundError as error:
        raise RewardError(f"Cannot import {source} for the {where}: {error}. Pass a module on the Python path or "
                          "py:path/to/file.py:FUNCTION.") from error
    except Exception as error:  # a syntax error or anything the file raises at import
        raise RewardError(f"Loading {source} for the {where} raised {type(error).__name__}: {error}"
                          f"{_user_frame(error, source)}.") from error
    candidate = getattr(module, function, None)
    if not callable(candidate):
        defined = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_"))
        raise RewardError(f"{source} has no function {function!r} (callables defined there: "
                          f"{', '.join(defined) or 'none'}).")
    return candidate


def _check_python_file(source: str) -> None:
    """RewardError when ``source`` names a ``.py`` file that does not exist (a module name passes)."""
    path = Path(source).expanduser()
    if source.endswith(".py") and not path.is_file():
        raise RewardError(f"No such file: {source} (resolved to {path.resolve()}); --reward py:FILE.py:FUNCTION "
                          "needs the path of a Python file.")


def _user_frame(error: BaseException, source: str) -> str:
    """`` (at FILE line N)``: the deepest traceback frame in the user's file, or ``""``."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f" (at {source} line {error.lineno})"
    name = Path(source).name if source.endswith(".py") else source.replace(".", "/").rsplit("/", 1)[-1] + ".py"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename).name == name]
    return f" (at {source} line {frames[-1].lineno})" if frames else ""
