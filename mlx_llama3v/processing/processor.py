"""``Processor``: a model's tokenizer and processor_config, as one callable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

from .prompts import PromptInputs, build_prompt


@dataclass
class Processor:
    """Turns conversations with images into model input (``processing.build_prompt``)."""

    tokenizer: Any
    config: Dict[str, Any]

    def __call__(
        self,
        messages: Sequence[Dict[str, Any]],
        images: Optional[Sequence[Any]] = None,
        add_generation_prompt: bool = True,
    ) -> PromptInputs:
        return build_prompt(messages, self.tokenizer, self.config, images, add_generation_prompt)
