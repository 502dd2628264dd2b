"""grain.data"""
