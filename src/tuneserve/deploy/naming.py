"""Azure naming rules and the template's derived default names.

`unique_string` reimplements ARM's `uniqueString()` (a MurmurHash64 variant, base-32 encoded to
13 characters). It reproduces the published test vectors of a public reimplementation that was
checked against Bicep; it has not been checked against Azure from here, so treat the derived
names as a deterministic approximation until `tuneserve provision` reads the real ones back from
the deployment's outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def _rotl32(x: int, r: int) -> int:
    x &= _M32
    return ((x << r) | (x >> (32 - r))) & _M32


def _fmix32(h: int) -> int:
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & _M32
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _murmur64(data: bytes) -> int:
    c1, c2 = 0xAB0E9789, 0x239B961B  # ARM's variant: MurmurHash3's two 32-bit lanes, seed 0
    h1 = h2 = 0
    n = len(data)
    i = 0
    while i + 8 <= n:
        k1 = int.from_bytes(data[i : i + 4], "little")
        k2 = int.from_bytes(data[i + 4 : i + 8], "little")
        k1 = (_rotl32((k1 * c2) & _M32, 15) * c1) & _M32
        k2 = (_rotl32((k2 * c1) & _M32, 17) * c2) & _M32
        h1 = (_rotl32(h1 ^ k1, 19) + h2) & _M32
        h1 = (h1 * 5 + 0x561CCD1B) & _M32
        h2 = (_rotl32(h2 ^ k2, 13) + h1) & _M32
        h2 = (h2 * 5 + 0x0BCAA747) & _M32
        i += 8
    rest = n - i
    if rest > 0:
        k1 = int.from_bytes(data[i : i + min(rest, 4)], "little")
        h1 ^= (_rotl32((k1 * c2) & _M32, 15) * c1) & _M32
        if rest > 4:
            k2 = int.from_bytes(data[i + 4 : n], "little")
            h2 ^= (_rotl32((k2 * c1) & _M32, 17) * c2) & _M32
    r0 = (h2 ^ n) & _M32
    r1 = ((h1 ^ n) + r0) & _M32
    r2 = (r0 + r1) & _M32
    r1, r2 = _fmix32(r1), _fmix32(r2)
    r1 = (r1 + r2) & _M32
    r2 = (r2 + r1) & _M32
    return ((r2 << 32) | r1) & _M64


def unique_string(*parts: str) -> str:
    """ARM's `uniqueString(parts...)`: 13 characters of [a-z2-7]."""
    h = _murmur64("-".join(parts).encode("utf-8"))
    out = []
    for _ in range(13):
        out.append(_ALPHABET[(h >> 59) & 31])
        h = (h << 5) & _M64
    return "".join(out)


def resource_group_id(subscription_id: str, resource_group: str) -> str:
    return f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}"


def resource_suffix(subscription_id: str, resource_group: str) -> str:
    """The template's `substring(uniqueString(resourceGroup().id), 0, 5)`."""
    return unique_string(resource_group_id(subscription_id, resource_group))[:5]


@dataclass(frozen=True)
class DerivedNames:
    storageAccountName: str
    fileShareName: str
    acaEnvironmentName: str
    acaEnvironmentStorageName: str
    acaAppName: str
    acaLogAnalyticsName: str


def derived_names(subscription_id: str, resource_group: str) -> DerivedNames:
    """The names the template gives resources whose parameter is null."""
    s = resource_suffix(subscription_id, resource_group)
    return DerivedNames(
        storageAccountName=f"aistorage{s}",
        fileShareName=f"aifileshare{s}",
        acaEnvironmentName=f"aienv{s}",
        acaEnvironmentStorageName=f"aienvstorage{s}",
        acaAppName=f"aiacaapp{s}",
        acaLogAnalyticsName=f"ailog{s}",
    )


# --- naming rules (learn.microsoft.com "Naming rules and restrictions for Azure resources") ---


@dataclass(frozen=True)
class NameRule:
    what: str
    min_len: int
    max_len: int
    pattern: str  # full-match regex
    accepted: str  # the rule in words, for messages

    def check(self, name: str) -> str | None:
        """None when `name` is valid, else why not (naming the rule)."""
        if not self.min_len <= len(name) <= self.max_len:
            return (
                f"{self.what} name {name!r} has {len(name)} characters; "
                f"it must have {self.min_len}-{self.max_len}: {self.accepted}"
            )
        if re.fullmatch(self.pattern, name):
            return None
        hint = ""
        if name != name.lower():
            hint = " (it has uppercase letters)"
        elif "--" in name:
            hint = " (it has a double hyphen)"
        elif name.endswith("-"):
            hint = " (it ends with a hyphen)"
        elif not name[0].isalpha() and self.pattern.startswith(("[a-z]", "[A-Za-z]")):
            hint = " (it does not start with a letter)"
        return f"{self.what} name {name!r} is not valid{hint}: {self.accepted}"


_HYPHENATED = r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*"
STORAGE_ACCOUNT = NameRule(
    "storage account", 3, 24, r"[a-z0-9]+", "lowercase letters and digits only"
)
FILE_SHARE = NameRule(
    "file share",
    3,
    63,
    r"[a-z0-9]+(?:-[a-z0-9]+)*",
    "lowercase letters, digits and single hyphens, starting and ending with a letter or digit",
)
CONTAINER_APP = NameRule(
    "container app",
    2,
    32,
    _HYPHENATED,
    "lowercase letters, digits and single hyphens, starting with a letter, "
    "not ending with a hyphen",
)
ACA_ENVIRONMENT = NameRule(
    "container apps environment",
    2,
    60,
    r"[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*",
    "letters, digits and single hyphens, starting with a letter, not ending with a hyphen",
)
ACA_ENVIRONMENT_STORAGE = NameRule(
    "environment storage",
    2,
    32,
    r"[a-z0-9]+(?:-[a-z0-9]+)*",
    "lowercase letters, digits and single hyphens, starting and ending with a letter or digit",
)
LOG_ANALYTICS = NameRule(
    "Log Analytics workspace",
    4,
    63,
    r"[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]",
    "letters, digits and hyphens, starting and ending with a letter or digit",
)
REVISION_SUFFIX = NameRule(
    "revision suffix",
    1,
    40,
    _HYPHENATED,
    "lowercase letters, digits and single hyphens, starting with a letter",
)

RULES_BY_PARAMETER: dict[str, NameRule] = {
    "storageAccountName": STORAGE_ACCOUNT,
    "fileShareName": FILE_SHARE,
    "acaEnvironmentName": ACA_ENVIRONMENT,
    "acaEnvironmentStorageName": ACA_ENVIRONMENT_STORAGE,
    "acaAppName": CONTAINER_APP,
    "acaLogAnalyticsName": LOG_ANALYTICS,
}
