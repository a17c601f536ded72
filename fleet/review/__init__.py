"""The review loop: queues for people, their confirmed labels, gated and reversible model changes."""
