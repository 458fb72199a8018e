"""Every Redis write of the task lifecycle: one Lua script per transition.

Each ``<name>.lua`` sits beside ``<name>.py``, the one wrapper that builds its KEYS and
ARGV and parses its reply. Scripts receive every key they touch in KEYS (the task record
and unique lock included), never build a key name, and touch one queue's slot only.
"""
