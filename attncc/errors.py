"""attncc's errors: the bottom layer, imported by every other one (policy, codegen, passes, the API)."""

from __future__ import annotations


class AttnccError(RuntimeError):
    """A problem attncc found in a model or its graph (as opposed to a bad policy)."""


class VerificationError(AttnccError):
    """verify=True found a rewritten graph whose output differs from the original graph's."""


class MaskMismatch(AttnccError):
    """The mask given at run time does not have the structure its site was compiled for."""


class PolicyError(ValueError):
    """An invalid policy: names the source, the field path, the problem and the valid choices."""

    def __init__(self, problem: str, path: str = "", source: str = "<dict>"):
        self.problem, self.path, self.source = problem, path, source
        super().__init__(": ".join(part for part in (source, path, problem) if part))

    def within(self, prefix: str) -> PolicyError:
        """The same error, one level further out in the policy tree."""
        separator = "." if prefix and self.path and not self.path.startswith("[") else ""
        return PolicyError(self.problem, prefix + separator + self.path, self.source)

    def with_source(self, source: str) -> PolicyError:
        return PolicyError(self.problem, self.path, source)
