"""grain.flows"""
