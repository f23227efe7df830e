"""regretless: LoRA fine-tuning the way "LoRA Without Regret" (Schulman & Thinking Machines, 2025) prescribes.

Data flows one way: config -> models -> lora (or not, for FullFT) -> train (SFT or RL) -> run files
-> sweep (ledger) -> report. `recipe` holds the paper's rules as pure functions used by all of them.
"""

__version__ = "0.1.0"
