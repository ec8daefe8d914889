"""The one exception type for data problems: it says what is wrong and how to fix it."""


class DataError(RuntimeError):
    def __init__(self, problem: str, fix: str | None = None):
        self.problem, self.fix = problem, fix
        super().__init__(problem if fix is None else f"{problem}. Fix: {fix}")
