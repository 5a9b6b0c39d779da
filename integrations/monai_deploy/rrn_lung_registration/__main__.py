"""The application folder's entry point (what a MAP runs): ``python <folder> -i ... -o ... -m ...``."""

from app import RRNRegistrationApp

if __name__ == "__main__":
    RRNRegistrationApp().run()
