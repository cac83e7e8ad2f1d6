"""TwiSTAR's second stage (slow-model GRPO rewards, planner reward); stdlib only, so that a
training script can import it without the warehouse."""
