"""The benchmark suite behind ``sdfast bench``: every backend timed the same way beside diffusers' pipeline.

arch.py (random weights at SD shapes) · flops.py (U-Net FLOPs from shapes) · env.py (versions, device peaks) ·
baseline.py (diffusers, timed like sdfast) · run.py (configurations and measurement) · report.py (JSON schema,
markdown, chart, compare).
"""
