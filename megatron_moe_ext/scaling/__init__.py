"""Granularity scaling-law lab: compute-matched sweeps (plan, run, collect), law fits and compute-optimal plans.

Data flows one way: ``sweep plan`` writes a runs table and commands; ``sweep run`` executes them with
``megatron-moe-ext train``; ``sweep collect`` writes a results table; ``fit`` reads results tables (or a
plain CSV of published points) and writes coefficients; ``plan`` reads coefficients (fitted or a named
preset) and answers for a compute budget. Nothing here imports megatron-core.
"""
