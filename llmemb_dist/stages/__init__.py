"""The stages, a folder each: prepare -> scft -> embed -> rat, chained by pipeline.py.

Each folder holds a driver (validate, skip when published, run, publish) beside the Ray-free
pieces it needs. Stages never import each other: they meet in storage, at the paths of layout.py.
"""
