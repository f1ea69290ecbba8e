"""Ask a converted Llama 3-V model about a picture, then a follow-up question.

mlx_llama3v.convert --hf-path mustafaaljadery/llama3v --mlx-path llama3v-4bit -q
python examples/generate.py llama3v-4bit
"""

import sys
from pathlib import Path

from mlx_llama3v import generate, load, stream_generate
from mlx_llama3v.chat import ChatSession

model_path = sys.argv[1] if len(sys.argv) > 1 else "llama3v-4bit"
cat = Path(__file__).with_name("cat.png")

model, processor = load(model_path)

# one question, streamed
for response in stream_generate(
    model, processor, "What is in this image?", images=[cat], max_tokens=128
):
    print(response.text, end="", flush=True)
print()

# the whole answer at once, with its statistics
result = generate(model, processor, "What colour are the cat's eyes?", images=[cat], max_tokens=64)
print(result.text)
print(
    f"{result.generation_tokens} tokens at {result.generation_tps:.1f} tokens/s, peak memory {result.peak_memory:.2f} GB"
)

# a conversation: the follow-up reuses the image features and the KV cache
chat = ChatSession(model, processor, max_tokens=128)
print(chat.ask("Describe this picture in one sentence.", images=[cat]).text)
follow_up = chat.ask("Is the animal awake?")
print(follow_up.text)
print(
    f"follow-up: {follow_up.cached_tokens} prompt tokens reused, {follow_up.tiles_encoded} tiles encoded"
)
