"""A user's own model or data, named in the config as "package.module:function".

The module is imported as Python imports any module: from the installed packages, PYTHONPATH, or the folder the
command runs in (added to the search path here, as `python -m` would add it). Flower's actors get the same path
(engines/flower.py passes sys.path on); a deployed node imports it from its own path, as it runs the app's code.
"""
import importlib
import os
import re
import sys
import traceback

SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")  # dotted module, a colon, a function name


class UserCodeError(Exception):
    """The named function cannot be found, or it failed or returned something unusable."""


def is_spec(name):
    """Whether `name` names a function of the user's ("module:function") rather than a built-in."""
    return ":" in name


def find(spec, what):
    """The function `spec` names; `what` ("model_name", "type") says which config key named it, for messages."""
    if not SPEC.fullmatch(spec):
        raise UserCodeError(f"{what} '{spec}' is not of the form package.module:function")
    module_name, function_name = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or whatever the module raises while it is imported
        raise UserCodeError(f"{what} '{spec}': cannot import {module_name} ({failure(e)})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserCodeError(f"{what} '{spec}': {module_name} has no function {function_name}")
    return function


def call(spec, what, *args):
    """The result of the function `spec` names, called with `args`; an exception it raises becomes one line."""
    try:
        return find(spec, what)(*args)
    except UserCodeError:
        raise
    except Exception as e:
        raise UserCodeError(f"{what} '{spec}' raised {failure(e)}") from None


def failure(error):
    """An exception as one line: its type, message and the line of user code it came from."""
    message = " ".join(str(error).split())[:300]
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)  # the user's lines, not import's or ours
              if not frame.filename.startswith("<") and frame.filename != __file__]
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}: {message}{where}" if message else f"{type(error).__name__}{where}"
