"""The bottom layer: what every other package needs and none of them owns.

`errors` (errors that name the offending input), `fs` (atomic writes, published permissions),
`locks` (one writer per output folder), `hashing` (content hashes of model folders), `cache`
(the per-machine cache, its sections registered by their owners), `devices` (devices and
dtypes) and `validation` (pieces shared by every spec). It imports nothing of ours.
"""
