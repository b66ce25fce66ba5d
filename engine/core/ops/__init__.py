"""core.ops"""
