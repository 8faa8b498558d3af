"""Test doubles: in-memory stand-ins for the outside systems capsuled talks to.

They live under tests/, not in the product: nothing in the wheel may depend on them.
"""
