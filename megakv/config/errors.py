"""The one exception type for configuration mistakes: it names the field, the bad value and the fix."""


class ConfigError(ValueError):
    def __init__(self, field: str, value, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(f"config field '{field}' = {value!r}: {problem}. Fix: {fix}")
