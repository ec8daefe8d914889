"""The one exception type for configuration mistakes: it names the field, the bad value and the fix."""

UNSET = object()  # marks "no value to show", e.g. for a misspelt key


class ConfigError(ValueError):
    def __init__(self, field: str, value, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        shown = "" if value is UNSET else f" = {value!r}"
        problem = problem if problem.endswith(('.', '?', '!')) else problem + '.'
        super().__init__(f"config field '{field}'{shown}: {problem} Fix: {fix}")
