"""Offline prose for synthetic prompts: text that ships with every Python install.

The eval haystacks and the profiler's calibration prompts both need a lot of natural,
non-repeating English without downloads. The source is the language reference's topic
help (`pydoc_data.topics`, ~30k words); some distributions strip it, and then module
docstrings stand in.
"""
from __future__ import annotations

import importlib

# Used only if pydoc_data was stripped from this Python install.
FALLBACK_MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "heapq", "hmac", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "mailbox", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "shlex",
    "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "typing", "unittest", "urllib",
    "uuid", "warnings", "weakref", "zipfile",
)


def pydoc_topic_texts() -> list[str]:
    """The help topics of the language reference, in a fixed order ([] when stripped)."""
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except ImportError:
        return []
    return [topics[k] for k in sorted(topics)]


def module_docstrings() -> list[str]:
    """Docstrings of FALLBACK_MODULES that import, in that order."""
    texts = []
    for name in FALLBACK_MODULES:
        try:
            doc = importlib.import_module(name).__doc__
        except ImportError:
            continue
        if doc:
            texts.append(doc)
    return texts
