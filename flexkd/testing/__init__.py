"""Test hooks that production code honours only when the environment turns them on."""
