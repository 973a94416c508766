"""Integrations with other training libraries (optional extras; nothing here is imported by ``fastpref``).

* :mod:`fastpref.integrations.trl`: run TRL's ``DPOTrainer`` on fastpref's fused op and objectives
  (``pip install "fastpref[trl]"``).
"""
