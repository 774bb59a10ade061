"""A user's own model or data, named in the config as "package.module:function".

The module is imported as Python imports any module: from the installed packages, PYTHONPATH, or the folder the
command runs in (added to the search path here, as `python -m` would add it). Flower's actors get the same path
(engines/flower.py passes sys.path on); a deployed node imports it from its own path, as it runs the app's code.
"""
import importlib
import keyword
import os
import reprlib
import sys
import traceback

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the project's own top-level modules and packages: a user's module of the same name could not be imported beside them
OWN_NAMES = {entry.removesuffix(".py") for entry in os.listdir(PROJECT)
             if entry.endswith(".py") or os.path.isfile(os.path.join(PROJECT, entry, "__init__.py"))}
# of them, fedsparse's own code: examples/ holds models and data that a config names as a user's would be named
OURS = OWN_NAMES - {"examples"}


class UserCodeError(Exception):
    """The named function cannot be found, or it failed or returned something unusable."""


def is_spec(name):
    """Whether `name` names a function of the user's ("module:function") rather than a built-in."""
    return ":" in name


def well_formed(spec):
    """Whether `spec` is a dotted module name, a colon and a function name (Python identifiers, not keywords)."""
    module_name, colon, function_name = spec.partition(":")
    names = module_name.split(".") + [function_name]
    return bool(colon) and all(name.isidentifier() and not keyword.iskeyword(name) for name in names)


def find(spec, what):
    """The function `spec` names; `what` ("model_name", "type") says which config key named it, for messages."""
    shown = reprlib.repr(spec)
    if not well_formed(spec):
        raise UserCodeError(f"{what} {shown} is not of the form package.module:function")
    module_name, function_name = spec.split(":")
    if module_name.split(".")[0] in OURS:
        raise UserCodeError(f"{what} {shown}: {module_name.split('.')[0]} is one of fedsparse's own modules; give "
                            f"yours another name")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # ModuleNotFoundError, or whatever the module raises (sys.exit too) while imported
        raise UserCodeError(f"{what} {shown}: cannot import {module_name} ({failure(e)})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserCodeError(f"{what} {shown}: {module_name} has no function {function_name}")
    return function


def source(spec):
    """Where the function `spec` names was read from: its module's file, relative to the working folder if within."""
    path = getattr(sys.modules.get(spec.split(":")[0]), "__file__", None) or spec
    relative = os.path.relpath(path)
    return spec if path == spec else path if relative.startswith("..") else relative


def call(spec, what, *args):
    """The result of the function `spec` names, called with `args`; whatever it raises (sys.exit included, which
    must not end a run as if it had succeeded) becomes one line. A Ctrl-C stays a stop."""
    function = find(spec, what)
    try:
        return function(*args)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise UserCodeError(f"{what} {reprlib.repr(spec)} raised {failure(e)}") from None


def failure(error):
    """An exception as one line: its type, message and the line it came from, the user's own where the traceback
    passes through it (not torch's, the standard library's or fedsparse's)."""
    try:
        message = " ".join(str(error).split())[:300]
    except Exception:  # an exception whose message itself fails
        message = ""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith("<")]
    theirs = [frame for frame in frames if not ours_or_a_library(frame.filename)]
    frame = (theirs or [f for f in frames if f.filename != __file__] or [None])[-1]
    where = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
    return f"{type(error).__name__}: {message}{where}" if message else f"{type(error).__name__}{where}"


def ours_or_a_library(path):
    """Whether `path` is one of fedsparse's own files (its examples aside) or an installed library's."""
    if path.startswith((sys.prefix + os.sep, sys.base_prefix + os.sep)):
        return True
    relative = os.path.relpath(path, PROJECT)
    return not relative.startswith("..") and relative.split(os.sep)[0].removesuffix(".py") in OURS
