"""Benchmarks behind the README's speed claims (issue 6): scripts, not tests. ``make bench`` runs them all."""
