"""RMM's parts: the merge-map environment, the PPO agent around it, Dynamic Average Reward, and plots.

The strategy that drives them behind ask/tell is `search.strategies.rmm`.
"""
