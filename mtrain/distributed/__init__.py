"""Ranks and their process group: collectives, heartbeats, process hygiene and host memory."""
