"""grain.evaluate"""
