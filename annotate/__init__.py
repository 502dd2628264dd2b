"""grain.annotate"""
