"""grain.train"""
