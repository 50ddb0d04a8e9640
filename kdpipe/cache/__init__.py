"""The on-disk target cache: sharded .npy files, resumable writer, memory-mapped reader, verify, merge.

Bytes on disk: docs/cache-format.md.
"""

from kdpipe.cache.format import FORMAT_VERSION
from kdpipe.cache.reader import Cache, ShardedArray, info, open
from kdpipe.cache.verify import merge, verify
from kdpipe.cache.writer import CacheWriter, create_or_resume

__all__ = [
    "FORMAT_VERSION",
    "Cache",
    "CacheWriter",
    "ShardedArray",
    "create_or_resume",
    "info",
    "merge",
    "open",
    "verify",
]
