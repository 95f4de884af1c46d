"""The one place that pins the upstream SGLang release this distribution extends.

scripts/setup.sh reads this line with sed, so keep it a plain string assignment.
"""

SGLANG_VERSION = "0.5.23"
