"""User-facing errors: one line naming the file (or input) and the problem."""


class InputError(Exception):
    """Bad user input. ``str(err)`` is a single line: ``<what>: <problem>``."""

    def __init__(self, what, problem: str):
        self.what = str(what)
        self.problem = problem
        super().__init__(f"{self.what}: {problem}")


def read_json_object(path, missing: str = "file not found") -> dict:
    """A JSON object from a file, or an InputError naming the file (missing, unreadable, not JSON, not an object)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InputError(path, missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object")
    return data
