"""serving/http"""
